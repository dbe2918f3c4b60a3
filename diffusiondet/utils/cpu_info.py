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
from typing import Dict, List, Mapping, Optional

import torch

__all__ = [
    "AVX2_EMULATION_ENV", "cpu_model_name", "describe_cpu", "emulation_problems", "emulation_unverified",
    "kernel_isas", "parse_kernel_report", "probe_report",
]

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


def probe_report(env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> str:
    """Raw stdout + stderr of the probe child run with ``env`` and the libraries' verbose modes
    (the text that ``tests/fixtures/cpu_reports`` records for several CPUs)."""
    child_env = {**os.environ, **(env or {}), "MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], env=child_env, capture_output=True, text=True,
        timeout=timeout, check=True,
    )  # fmt: skip
    return run.stdout + run.stderr


def parse_kernel_report(text: str) -> Dict[str, str]:
    """The one parser of the libraries' reports: ``text`` is a ``probe_report`` output.

    Returns a dict with ``aten`` (e.g. "AVX2"), ``threads`` (str), ``mkl`` and ``onednn`` (the
    libraries' own descriptions of the instruction set they run, "" if the library stayed
    silent). oneMKL's banner names an instruction set on Intel processors only: on AMD it reads
    "Intel(R) Architecture processors" whatever ``MKL_ENABLE_INSTRUCTIONS`` says.
    """
    mkl = re.search(r"MKL_VERBOSE oneMKL.*? for Intel\(R\) 64 architecture (.*?)(?:, Lnx|$)", text, re.M)
    onednn = re.search(r"onednn_verbose,.*?info,cpu,isa:(.*)$", text, re.M)
    aten = re.search(r"^ATEN (\S+) (\d+)$", text, re.M)
    return {
        "aten": aten.group(1) if aten else "",
        "threads": aten.group(2) if aten else "",
        "mkl": mkl.group(1).strip() if mkl else "",
        "onednn": onednn.group(1).strip() if onednn else "",
    }


def kernel_isas(env: Optional[Mapping[str, str]] = None, timeout: float = 120.0) -> Dict[str, str]:
    """``parse_kernel_report`` of a probe child run with ``env`` (keys: aten, threads, mkl, onednn)."""
    return parse_kernel_report(probe_report(env, timeout))


# Words with which MKL and oneDNN describe an instruction set; a description with none of them
# (oneMKL on AMD: "Intel(R) Architecture processors") says nothing about the ISA in use.
_ISA_WORDS = ("AVX", "SSE", "AMX")
_WIDER_THAN_AVX2 = ("AVX-512", "AVX512", "AVX10", "AMX")


def emulation_problems(isas: Mapping[str, str]) -> List[str]:
    """What in ``kernel_isas`` output contradicts the AVX2 one-thread emulation ([] = none).

    Only what a library reports can contradict it: a library that names no instruction set is
    listed by ``emulation_unverified`` instead.
    """
    problems = []
    if isas["aten"] not in ("AVX2", "DEFAULT"):
        problems.append(f"ATen capability is {isas['aten']!r}, expected AVX2 or DEFAULT")
    if isas["threads"] != "1":
        problems.append(f"torch uses {isas['threads']} threads, expected 1")
    for lib in ("mkl", "onednn"):
        if any(tag in isas[lib] for tag in _WIDER_THAN_AVX2):
            problems.append(f"{lib} still uses {isas[lib]!r}")
    return problems


def emulation_unverified(isas: Mapping[str, str]) -> List[str]:
    """The libraries whose instruction-set cap this CPU does not let us check, with the reason."""
    notes = []
    for lib in ("mkl", "onednn"):
        text = isas[lib]
        if not text:
            notes.append(f"{lib} printed no report: its AVX2 cap is not verified")
        elif not any(word in text for word in _ISA_WORDS):
            notes.append(f"{lib} names no instruction set on this CPU ({text!r}): its AVX2 cap is not verified")
    return notes


def main(argv=None) -> int:
    """``python -m diffusiondet.utils.cpu_info [--emulate-avx2 -- CMD ... | --record DIR]``.

    Without arguments, print what the kernels use here (and under the AVX2 emulation). With
    ``--emulate-avx2 -- CMD``, run CMD with ``AVX2_EMULATION_ENV`` after checking that the
    libraries honour it (exit 3 if one reports a wider instruction set; a library that names
    none on this CPU is reported as unverified). ``--record DIR`` writes the raw native and
    emulated reports of this CPU to DIR (the files of ``tests/fixtures/cpu_reports``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--emulate-avx2"]:
        command = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        isas = kernel_isas(AVX2_EMULATION_ENV)
        problems = emulation_problems(isas)
        if problems:
            print("AVX2 emulation not in effect: " + "; ".join(problems), file=sys.stderr)
            return 3
        print("AVX2 emulation in effect: " + " ".join(f"{k}={v}" for k, v in AVX2_EMULATION_ENV.items()))
        for note in emulation_unverified(isas):
            print(f"AVX2 emulation: {note}")
        if not command:
            return 0
        env = {**os.environ, **AVX2_EMULATION_ENV, "DIFFDET_AVX2_EMULATION": "1"}
        return subprocess.run(command, env=env).returncode
    if argv[:1] == ["--record"] and len(argv) == 2:
        os.makedirs(argv[1], exist_ok=True)
        for name, env in (("native", {"OMP_NUM_THREADS": "2"}), ("avx2-emulation", AVX2_EMULATION_ENV)):
            path = os.path.join(argv[1], f"this-cpu.{name}.txt")
            with open(path, "w") as f:
                f.write(probe_report(env))
            print(f"wrote {path}")
        return 0
    print(describe_cpu())
    for name, env in (("native", None), ("avx2 emulation", AVX2_EMULATION_ENV)):
        isas = kernel_isas(env)
        print(f"{name}: {isas}" + "".join(f"\n  {note}" for note in emulation_unverified(isas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
