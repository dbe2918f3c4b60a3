"""The AVX2 emulation that `make test` relies on really changes the kernels, and is checked."""
import os
import subprocess
import sys

import pytest
import torch

from diffusiondet.utils.cpu_info import (
    AVX2_EMULATION_ENV,
    describe_cpu,
    emulation_problems,
    kernel_isas,
    main,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_emulation_settings_reach_aten_mkl_and_onednn():
    isas = kernel_isas(AVX2_EMULATION_ENV)
    assert isas["aten"] in ("AVX2", "DEFAULT") and isas["threads"] == "1"
    assert "AVX2" in isas["mkl"] and "AVX2" in isas["onednn"], isas
    assert emulation_problems(isas) == []


def test_native_report_matches_this_process():
    # The child inherits this process's environment, so it must see the same ATen capability.
    isas = kernel_isas({"OMP_NUM_THREADS": "2"})
    assert isas["aten"] == torch.backends.cpu.get_cpu_capability()
    assert isas["threads"] == "2"
    assert isas["mkl"] and isas["onednn"]
    assert torch.backends.cpu.get_cpu_capability() in describe_cpu()


def test_emulation_problems_name_what_is_wrong():
    native_xeon = {
        "aten": "AVX512", "threads": "2",
        "mkl": "Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) ... (Intel(R) AMX)",
        "onednn": "Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support",
    }  # fmt: skip
    problems = emulation_problems(native_xeon)
    assert len(problems) == 4
    assert "AVX512" in problems[0] and "2 threads" in problems[1]
    assert problems[2].startswith("mkl") and problems[3].startswith("onednn")
    silent = {"aten": "AVX2", "threads": "1", "mkl": "", "onednn": "Intel AVX2"}
    assert emulation_problems(silent) == ["mkl reported no instruction set"]


def test_wrapper_runs_the_command_under_the_emulation(capsys):
    probe = "import os, sys, torch; sys.exit(0 if (torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(), os.environ['DIFFDET_AVX2_EMULATION']) == ('AVX2', 1, '1') else 7)"
    assert main(["--emulate-avx2", "--", sys.executable, "-c", probe]) == 0
    assert main(["--emulate-avx2", "--", sys.executable, "-c", "import sys; sys.exit(5)"]) == 5
    assert "AVX2 emulation in effect" in capsys.readouterr().out


def test_a_session_claiming_emulation_without_it_refuses_to_run(tmp_path):
    env = {**os.environ, "DIFFDET_AVX2_EMULATION": "1", "OMP_NUM_THREADS": "2"}
    for key in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(key, None)
    test_file = tmp_path / "test_x.py"
    test_file.write_text("def test_x():\n    pass\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.numerics_plugin", str(test_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert "DIFFDET_AVX2_EMULATION is set but ATen runs" in run.stdout + run.stderr
