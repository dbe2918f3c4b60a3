# Two entry points: `make demo` (set-up + main job) and `make test` (set-up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: env demo demo-inst demo-engine test benchmark clean

# The script is idempotent: it returns at once when the pinned environment is already there.
env:
	@bash tools/bootstrap_env.sh

demo: env
	$(PY) tools/run_main_job.py

# The DiffusionInst main job: the same synthetic set (it has polygon masks), box and mask AP.
demo-inst: env
	$(PY) tools/run_main_job.py --config-file configs/diffinst.synthetic.res18.yaml

# DiffusionEngine on the synthetic set: trains a tiny text-to-image LDM, then the adapter, the
# data engine and real vs real + generated training (docs/diffusion_engine.md).
demo-engine: env
	$(PY) tools/run_engine_job.py

# First the import contracts of setup.cfg (lint-imports: which package and layer may import
# which; a second, so a broken layering shows before the long suite; --no-cache keeps its cache
# folder out of the tree). Then the full suite, then the CPU-sensitive tests again as an AVX2-only
# machine with one thread (the instruction set and blocking of another CPU); the wrapper fails if
# MKL, oneDNN or ATen ignore the settings.
# All three passes always run (a failure in one must not hide the others); the exit status is
# non-zero if any failed, and the last line says which.
test: env
	@contracts=0; full=0; numerics=0; \
	$(VENV)/bin/lint-imports --no-cache || contracts=$$?; \
	$(PY) -m pytest -q || full=$$?; \
	$(PY) -m diffusiondet.utils.cpu_info --emulate-avx2 -- $(PY) -m pytest -q -m numerics || numerics=$$?; \
	echo "make test: import contracts exit $$contracts, full suite exit $$full, AVX2 one-thread numerics rerun exit $$numerics"; \
	[ $$contracts -eq 0 ] && [ $$full -eq 0 ] && [ $$numerics -eq 0 ]

benchmark: env
	$(PY) tools/benchmark.py

clean:
	rm -rf output
