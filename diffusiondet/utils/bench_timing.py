"""Wall-time and memory measurement helpers of ``tools/benchmark.py``.

Both synchronise CUDA so that asynchronous kernels are billed to the region that launched them.
"""
import time
from contextlib import contextmanager

import torch

__all__ = ["HeadTimer", "PeakMemory"]


class PeakMemory:
    """Peak memory of a code block: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status_mb(field: str) -> float:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    @contextmanager
    def measure(self, result: dict):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            try:  # Linux: "5" resets the peak RSS (VmHWM) of this process
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")
                base = self._status_mb("VmRSS")
            except OSError:
                base = None
        yield
        if self.cuda:
            result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            result["peak_mb"] = float("nan") if base is None else self._status_mb("VmHWM") - base


class HeadTimer:
    """Wall time spent inside the attached heads' forward (hooks; synchronises CUDA)."""

    def __init__(self, device: torch.device):
        self.total, self._start, self.device = 0.0, 0.0, device

    def attach(self, head: torch.nn.Module) -> None:
        head.register_forward_pre_hook(lambda *_: self._tick(start=True))
        head.register_forward_hook(lambda *_: self._tick(start=False))

    def _tick(self, start: bool):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if start:
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start
