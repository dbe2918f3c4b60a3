"""Fault drill: provoke every bad input and fault we know of, for real, and count the handled ones.

    python -m tests.drill            # every case (a few minutes on 2 cores)
    python -m tests.drill --fast     # the quick subset the test suite runs
    python -m tests.drill --only images/

(``python tools/fault_drill.py`` takes the same arguments.) Prints one line per case and a summary
``tried N, handled N, silent 0``; exits 1 when any case is silent. See
docs/reliability.md for the list of cases.
"""
import argparse
import logging
import sys

from . import annotations, config_weights, diffusioninst, distributed, evaluation, images, training
from .common import run_case, select, summary_line

MODULES = (images, annotations, config_weights, training, distributed, evaluation, diffusioninst)


def all_cases():
    return [case for module in MODULES for case in module.CASES]


def main(argv=None):
    # Named after the user-facing command (tools/fault_drill.py), not this package's __main__.py.
    parser = argparse.ArgumentParser(prog="fault_drill.py", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="skip the slow cases (training runs)")
    parser.add_argument("--only", default=None, help="run the cases whose id contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    cases = select(all_cases(), args.fast, args.only)
    if args.list:
        for case in cases:
            print(case.id + ("  (slow)" if case.slow else ""))
        return 0
    # The project logs what it skips; keep the drill's own output to one line per case. Cases
    # lower project loggers to capture their records, so the root handler filters on its own.
    logging.basicConfig(level=logging.CRITICAL)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.CRITICAL)
    results = []
    for case in cases:
        result = run_case(case)
        results.append(result)
        status = "handled" if result.handled else "SILENT "
        print(f"[{status}] {case.id:<40} {result.seconds:6.1f}s  {result.detail}", flush=True)
    print(summary_line(results), flush=True)
    return 0 if all(r.handled for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
