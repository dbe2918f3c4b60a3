"""The AVX2 emulation that `make test` relies on really changes the kernels, and is checked.

Every fact about the CPU goes through ``parse_kernel_report``; its tests run on the recorded
reports of several CPUs in ``tests/fixtures/cpu_reports`` (Intel with AVX-512 and AMX, AMD Zen 4
with AVX-512 but no AMX, AMD with AVX2 only). The tests that run the probe here assert only what
holds on every x86 CPU: no vendor string, instruction-set name or cache size of this machine.
"""
import os
import subprocess
import sys

import pytest
import torch

from diffusiondet.utils.cpu_info import (
    AVX2_EMULATION_ENV,
    describe_cpu,
    emulation_problems,
    emulation_unverified,
    kernel_isas,
    main,
    parse_kernel_report,
)

ROOT = os.path.join(os.path.dirname(__file__), "..")
REPORTS = os.path.join(os.path.dirname(__file__), "fixtures", "cpu_reports")

# file -> (parsed report, problems as an AVX2 one-thread emulation, unverified libraries)
RECORDED = {
    "intel-xeon-amx.native.reconstructed.txt": (
        {"aten": "AVX512", "threads": "2",
         "mkl": "Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16 "
                "(limited) instructions, and Intel(R) Advanced Matrix Extensions (Intel(R) AMX) with INT8 and BF16",
         "onednn": "Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support"},
        ["aten", "threads", "mkl", "onednn"], []),
    "intel-xeon-amx.avx2-emulation.reconstructed.txt": (
        {"aten": "AVX2", "threads": "1",
         "mkl": "Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors",
         "onednn": "Intel AVX2"},
        [], []),
    "amd-epyc-zen4.native.txt": (
        {"aten": "AVX512", "threads": "2", "mkl": "Intel(R) Architecture processors",
         "onednn": "Intel AVX-512 with Intel DL Boost and bfloat16 support"},
        ["aten", "threads", "onednn"], ["mkl"]),
    "amd-epyc-zen4.avx2-emulation.txt": (
        {"aten": "AVX2", "threads": "1", "mkl": "Intel(R) Architecture processors", "onednn": "Intel AVX2"},
        [], ["mkl"]),
    "amd-epyc-avx2.native.reconstructed.txt": (
        {"aten": "AVX2", "threads": "2", "mkl": "Intel(R) Architecture processors", "onednn": "Intel AVX2"},
        ["threads"], ["mkl"]),
}  # fmt: skip


def _read(name):
    with open(os.path.join(REPORTS, name)) as f:
        return f.read()


def test_every_recorded_report_has_expectations():
    assert sorted(f for f in os.listdir(REPORTS) if f.endswith(".txt")) == sorted(RECORDED)


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_reports_parse_and_get_the_right_verdict(name):
    expected, problem_subjects, unverified = RECORDED[name]
    isas = parse_kernel_report(_read(name))
    assert isas == expected
    problems = emulation_problems(isas)
    subjects = {"aten": "ATen capability", "threads": "torch uses", "mkl": "mkl ", "onednn": "onednn "}
    assert [next(k for k, v in subjects.items() if p.startswith(v)) for p in problems] == problem_subjects
    assert [note.split()[0] for note in emulation_unverified(isas)] == unverified


def test_a_library_that_stays_silent_is_unverified_not_a_failure():
    isas = parse_kernel_report("ATEN AVX2 1\n")
    assert isas == {"aten": "AVX2", "threads": "1", "mkl": "", "onednn": ""}
    assert emulation_problems(isas) == []
    assert emulation_unverified(isas) == [
        "mkl printed no report: its AVX2 cap is not verified",
        "onednn printed no report: its AVX2 cap is not verified",
    ]


def test_problems_name_the_capability_and_the_library():
    isas = parse_kernel_report(_read("intel-xeon-amx.native.reconstructed.txt"))
    problems = emulation_problems(isas)
    assert "'AVX512'" in problems[0] and "2 threads" in problems[1]
    assert "AMX" in problems[2] and "AVX10.1" in problems[3]


def test_emulation_settings_reach_the_libraries_that_report():
    # On this machine, whatever its vendor: what a library reports must not contradict AVX2.
    isas = kernel_isas(AVX2_EMULATION_ENV)
    assert isas["aten"] in ("AVX2", "DEFAULT") and isas["threads"] == "1"
    assert emulation_problems(isas) == [], isas


def test_native_report_matches_this_process():
    # The child inherits this process's environment, so it must see the same ATen capability.
    isas = kernel_isas({"OMP_NUM_THREADS": "2"})
    assert isas["aten"] == torch.backends.cpu.get_cpu_capability()
    assert isas["threads"] == "2"
    assert torch.backends.cpu.get_cpu_capability() in describe_cpu()


def test_record_writes_reports_the_parser_reads(tmp_path):
    assert main(["--record", str(tmp_path)]) == 0
    native = parse_kernel_report((tmp_path / "this-cpu.native.txt").read_text())
    emulated = parse_kernel_report((tmp_path / "this-cpu.avx2-emulation.txt").read_text())
    assert native["threads"] == "2" and emulated["threads"] == "1"
    assert emulation_problems(emulated) == []


def test_wrapper_runs_the_command_under_the_emulation(capsys):
    probe = (
        "import os, sys, torch; ok = torch.backends.cpu.get_cpu_capability() in ('AVX2', 'DEFAULT')"
        " and torch.get_num_threads() == 1 and os.environ['DIFFDET_AVX2_EMULATION'] == '1'; sys.exit(0 if ok else 7)"
    )
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
