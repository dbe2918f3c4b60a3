"""The fault drill (tools/fault_drill.py, which runs tests/drill) in its fast mode, and its
harness's verdicts."""
import logging
import os
import re
import subprocess
import sys

import pytest

from tests.drill.common import (
    Case,
    Silent,
    capture_logs,
    expect_error,
    expect_logged,
    run_case,
    select,
    summary_line,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# Every category but "distributed" (2-process runs, slow only) has fast cases.
FAST_CATEGORIES = ("images", "annotations", "config_weights", "training", "evaluation")


def test_fast_drill_handles_every_case():
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "fault_drill.py"), "--fast"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    assert lines, run.stderr[-2000:]
    summary = re.fullmatch(r"tried (\d+), handled (\d+), silent (\d+)", lines[-1])
    assert summary, run.stdout[-3000:] + run.stderr[-2000:]
    tried, handled, silent = map(int, summary.groups())
    silent_lines = [line for line in lines if line.startswith("[SILENT")]
    assert silent == 0 and handled == tried and not silent_lines, "\n".join(silent_lines)
    assert run.returncode == 0
    case_lines = [line for line in lines if line.startswith("[handled]")]
    assert len(case_lines) == tried >= 40
    for category in FAST_CATEGORIES:
        assert any(f"] {category}/" in line for line in case_lines), category


def _case(fn, slow=False):
    return Case("unit", fn.__name__, fn, slow=slow)


def test_harness_counts_silent_faults_and_crashes():
    def quiet(workdir):
        raise Silent("nothing happened")

    def crash(workdir):
        raise KeyError("bad")

    def fine(workdir):
        assert os.path.isdir(workdir) and not os.listdir(workdir)
        return "error ValueError: names the file"

    results = [run_case(_case(f)) for f in (quiet, crash, fine)]
    assert [r.handled for r in results] == [False, False, True]
    assert results[0].detail == "SILENT: nothing happened"
    assert results[1].detail.startswith("SILENT (unexpected crash): KeyError")
    assert summary_line(results) == "tried 3, handled 1, silent 2"
    slow = _case(fine, slow=True)
    assert [c.slow for c in select([slow, _case(quiet)], fast=True)] == [False]
    assert len(select([slow, _case(quiet)], fast=False, only="fine")) == 1


def test_expect_error_requires_the_culprit_in_the_message():
    def bad():
        raise ValueError("cannot read 'a.jpg'")

    assert expect_error(bad, names=["a.jpg"]).startswith("error ValueError")
    with pytest.raises(Silent, match="does not name"):
        expect_error(bad, names=["b.jpg"])
    with pytest.raises(Silent, match="no error raised"):
        expect_error(lambda: None, names=["a.jpg"])
    with pytest.raises(ValueError):  # an error of another type escapes (and counts as a crash)
        expect_error(bad, names=["a.jpg"], exc=(KeyError,))


def test_logged_skips_must_name_the_culprit():
    with capture_logs("drill_unit") as messages:
        logging.getLogger("drill_unit.child").warning("Skipping training image '%s'", "x.png")
        logging.getLogger("drill_unit").debug("below the level")
    assert messages == ["Skipping training image 'x.png'"]
    assert expect_logged(messages, ["x.png", "Skipping"]).startswith("logged")
    with pytest.raises(Silent, match="no log line"):
        expect_logged(messages, ["y.png"])
