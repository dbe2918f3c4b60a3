#!/usr/bin/env python
"""Fault drill: provoke every bad input and fault we know of, for real, and count the handled ones.

    python tools/fault_drill.py            # every case (a few minutes on 2 cores)
    python tools/fault_drill.py --fast     # the quick subset the test suite runs
    python tools/fault_drill.py --only images/

Prints one line per case and a summary ``tried N, handled N, silent 0``; exits 1 when any case is
silent. See docs/reliability.md for the list of cases.

The cases are a test harness and live with the tests (``tests/drill/``). A tool does not import
the tests, so this command runs them as ``python -m tests.drill`` from the repository root (the
root is what makes ``tests`` importable there) and passes its arguments and exit code through.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return subprocess.run([sys.executable, "-m", "tests.drill", *argv], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
