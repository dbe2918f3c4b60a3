"""Which CPU and which kernel instruction sets a process really uses.

Float results of GEMMs and convolutions depend on the kernels PyTorch, MKL and oneDNN pick, and
those follow the CPU (AVX-512 / AMX on recent Xeons, AVX2 on many AMD EPYCs), the thread count
and three environment variables that cap the instruction set:

* ``ATEN_CPU_CAPABILITY`` (``avx2``, ``default``): ATen's vectorised elementwise kernels;
* ``MKL_ENABLE_INSTRUCTIONS`` (``AVX2``): MKL's BLAS (``torch.mm``, ``F.linear``, ``bmm``);
* ``ONEDNN_MAX_CPU_ISA`` (``AVX2``): oneDNN's convolutions.

``kernel_isas`` asks the libraries themselves (their verbose modes, in a child process) so that
a test run that claims to emulate an AVX2 machine can prove it does.
"""
import os
import platform
import re
import subprocess
import sys
from typing import Dict, Mapping, Optional

import torch

__all__ = ["AVX2_EMULATION_ENV", "cpu_model_name", "describe_cpu", "emulation_problems", "kernel_isas"]

# The settings `make test` uses to re-run the numerics tests as an AVX2-only, one-thread machine.
AVX2_EMULATION_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

# A GEMM through MKL and a convolution large enough for oneDNN's JIT kernels.
_PROBE = (
    "import torch\n"
    "a = torch.randn(128, 128); (a @ a).sum()\n"
    "x = torch.randn(1, 32, 32, 32); w = torch.randn(32, 32, 3, 3)\n"
    "torch.nn.functional.conv2d(x, w, padding=1).sum()\n"
    "print('ATEN', torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())\n"
)


def cpu_model_name() -> str:
    """The processor's marketing name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_cpu() -> str:
    """One line for logs and benchmark headers: CPU, ATen capability, torch threads."""
    return (
        f"{cpu_model_name()}, {os.cpu_count()} cores; ATen {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} torch threads"
    )


def kernel_isas(env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> Dict[str, str]:
    """Instruction sets that ATen, MKL and oneDNN report for a child process run with ``env``.

    Returns a dict with ``aten`` (e.g. "AVX2"), ``threads`` (str), ``mkl`` and ``onednn`` (the
    libraries' own ISA descriptions, "" if the library stayed silent).
    """
    child_env = {**os.environ, **(env or {}), "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=child_env, capture_output=True, text=True,
        timeout=timeout, check=True,
    ).stdout  # fmt: skip
    mkl = re.search(r"MKL_VERBOSE oneMKL.*? for Intel\(R\) 64 architecture (.*?)(?:, Lnx|$)", out, re.M)
    onednn = re.search(r"onednn_verbose,.*?info,cpu,isa:(.*)$", out, re.M)
    aten = re.search(r"^ATEN (\S+) (\d+)$", out, re.M)
    return {
        "aten": aten.group(1) if aten else "",
        "threads": aten.group(2) if aten else "",
        "mkl": mkl.group(1).strip() if mkl else "",
        "onednn": onednn.group(1).strip() if onednn else "",
    }


def emulation_problems(isas: Mapping[str, str]) -> list:
    """What in ``kernel_isas`` output contradicts the AVX2 one-thread emulation ([] = none)."""
    problems = []
    if isas["aten"] not in ("AVX2", "DEFAULT"):
        problems.append(f"ATen capability is {isas['aten']!r}, expected AVX2 or DEFAULT")
    if isas["threads"] != "1":
        problems.append(f"torch uses {isas['threads']} threads, expected 1")
    for lib in ("mkl", "onednn"):
        text = isas[lib]
        if not text:
            problems.append(f"{lib} reported no instruction set")
        elif any(tag in text for tag in ("AVX-512", "AVX512", "AVX10", "AMX")):
            problems.append(f"{lib} still uses {text!r}")
    return problems


def main(argv=None) -> int:
    """``python -m diffusiondet.utils.cpu_info [--emulate-avx2 -- CMD ...]``.

    Without a command, print what the kernels use here (and under the AVX2 emulation). With
    ``--emulate-avx2 -- CMD``, run CMD with ``AVX2_EMULATION_ENV`` after checking that the
    libraries honour it (exit 3 if they do not).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--emulate-avx2"]:
        command = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        problems = emulation_problems(kernel_isas(AVX2_EMULATION_ENV))
        if problems:
            print("AVX2 emulation not in effect: " + "; ".join(problems), file=sys.stderr)
            return 3
        print("AVX2 emulation in effect: " + " ".join(f"{k}={v}" for k, v in AVX2_EMULATION_ENV.items()))
        if not command:
            return 0
        env = {**os.environ, **AVX2_EMULATION_ENV, "DIFFDET_AVX2_EMULATION": "1"}
        return subprocess.run(command, env=env).returncode
    print(describe_cpu())
    for name, env in (("native", None), ("avx2 emulation", AVX2_EMULATION_ENV)):
        print(f"{name}: {kernel_isas(env)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
