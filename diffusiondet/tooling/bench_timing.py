"""Time and memory measurement of the benchmarks (``tools/benchmark.py``, its roofline, chunk
sweep and training part, ``tools/dev/profile_speed.py``).

Timings are ``torch.utils.benchmark.Timer`` measurements on a clock that waits for the device,
so that asynchronous CUDA kernels are billed to the calls that launched them.
"""
import timeit
from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch.utils.benchmark import Measurement, Timer

__all__ = ["HeadTimer", "PeakMemory", "best_of", "device_clock", "measure"]


def device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds, read after the queued work of ``device`` has finished."""

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return timeit.default_timer()

    return clock


def measure(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    setup: Optional[Callable[[], object]] = None,
) -> Measurement:
    """``Timer.timeit(repeats)`` of ``fn()``: two untimed warm-up calls (allocator, kernel plans,
    compilation), then ``repeats`` calls timed as one block; ``.mean`` is seconds per call.

    Args:
        setup: called before the warm-up and again before the timed block, untimed (e.g. to
            reset a counter that the timed calls then fill).
    """
    timer = Timer(
        stmt="fn()",
        setup="setup()" if setup is not None else "pass",
        globals={"fn": fn, "setup": setup},
        timer=device_clock(device),
        # Timer's own default is one thread; the benchmarks measure torch's configured count.
        num_threads=torch.get_num_threads(),
    )
    return timer.timeit(repeats)


def best_of(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` separately measured calls (:func:`measure`): what
    the machine can do, where a median would also measure the other jobs of a shared machine."""
    return min(measure(fn, device, 1).mean for _ in range(repeats))


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
    """Seconds spent inside the attached heads' forward (hooks; on :func:`device_clock`).

    Not a :class:`Timer`: it measures a part of each call, which only hooks can see.
    """

    def __init__(self, device: torch.device):
        self.total, self._start, self._clock = 0.0, 0.0, device_clock(device)

    def reset(self) -> None:
        self.total = 0.0

    def attach(self, head: torch.nn.Module) -> None:
        head.register_forward_pre_hook(lambda *_: self._tick(start=True))
        head.register_forward_hook(lambda *_: self._tick(start=False))

    def _tick(self, start: bool):
        if start:
            self._start = self._clock()
        else:
            self.total += self._clock() - self._start
