# Two entry points: `make demo` (set-up + main job) and `make test` (set-up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo test benchmark clean

# The script is idempotent: it returns at once when the pinned environment is already there.
env:
	@bash tools/bootstrap_env.sh

demo: env
	$(PY) tools/run_main_job.py

test: env
	$(PY) -m pytest -q

benchmark: env
	$(PY) tools/benchmark.py

clean:
	rm -rf output
