"""pytest plugin (loaded from pytest.ini): report the CPU kernels in use, and refuse to run an
"AVX2 emulation" session in which the emulation is not in effect.

``make test`` re-runs the tests marked ``numerics`` through
``python -m diffusiondet.utils.cpu_info --emulate-avx2 -- pytest -m numerics``, which checks the
MKL and oneDNN instruction sets in a child process and sets ``DIFFDET_AVX2_EMULATION=1``; here the
session itself checks what ATen and the thread pool really use.
"""
import os

import pytest
import torch

from diffusiondet.utils.cpu_info import describe_cpu


def _cpu_line() -> str:
    mode = "AVX2 one-thread emulation" if os.environ.get("DIFFDET_AVX2_EMULATION") else "native"
    return f"CPU: {describe_cpu()} ({mode})"


def pytest_report_header(config):
    return _cpu_line()


def pytest_terminal_summary(terminalreporter):
    # `-q` hides the header; the CPU a result came from belongs in every log.
    if terminalreporter.config.get_verbosity() < 0:
        terminalreporter.write_line(_cpu_line())


def pytest_sessionstart(session):
    if not os.environ.get("DIFFDET_AVX2_EMULATION"):
        return
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    if capability not in ("AVX2", "DEFAULT") or threads != 1:
        pytest.exit(
            f"DIFFDET_AVX2_EMULATION is set but ATen runs {capability} with {threads} threads; "
            "start the session through `python -m diffusiondet.utils.cpu_info --emulate-avx2 --`",
            returncode=3,
        )
