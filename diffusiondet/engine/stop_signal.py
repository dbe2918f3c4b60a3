"""SIGTERM (what schedulers send before they kill a job): training stops at an iteration every
rank agrees on, with a checkpoint, and evaluation says what was lost (docs/reliability.md).

* :class:`StopOnSignal` is a training hook. Its signal handler only records the signal; after
  each step the ranks agree (one all-reduce) whether any rank got one, and if so every rank
  takes part in saving ``model_<iter>.pth`` (the checkpoint gathers every rank's RNG states, so
  ``--resume`` continues the run exactly) and the process exits with ``128 + signal`` through
  :class:`TrainingStopped`, without a traceback.
* :func:`forward_stop_signals` is for the launcher of a multi-process run: a signal sent to it
  reaches every rank, so a ``kill <launcher pid>`` stops the job as a scheduler's signal to
  each process would.
* :func:`stop_signals_abort` turns the signal into :class:`EvaluationStopped` during a
  stand-alone evaluation, whose message says that its results are lost.
* :func:`add_stop_signal`: a job launcher adds its own signal to the training's (a SLURM job
  through submitit adds the preemption signal, on which it requeues: diffusiondet/engine/slurm.py).
"""
import contextlib
import logging
import multiprocessing
import os
import signal
import threading

import torch
import torch.distributed as dist

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = [
    "EvaluationStopped",
    "STOP_SIGNALS",
    "StopOnSignal",
    "TrainingStopped",
    "add_stop_signal",
    "forward_stop_signals",
    "stop_signals_abort",
    "training_stop_signals",
]

logger = logging.getLogger(__name__)

# SIGTERM: SLURM (before SIGKILL at the time limit or on preemption), Kubernetes, systemd, `kill`.
STOP_SIGNALS = (signal.SIGTERM,)
_added = []  # add_stop_signal's, after STOP_SIGNALS


def add_stop_signal(signum: int) -> None:
    """Training in this process also stops on ``signum`` (a :class:`StopOnSignal` made later).
    It ranks after the signals before it: when ranks got different ones, all stop on this one."""
    if signum not in STOP_SIGNALS and signum not in _added:
        _added.append(signum)


def training_stop_signals() -> tuple:
    """STOP_SIGNALS, then the signals of :func:`add_stop_signal`, in ascending precedence."""
    return STOP_SIGNALS + tuple(_added)


class TrainingStopped(SystemExit):
    """Training ended early on a stop signal after writing a checkpoint; exit status 128 + signal.

    A ``SystemExit``: detectron2's training loop re-raises it without logging a traceback (it
    catches ``Exception`` only), its ``after_train`` hooks still run, and the process exits with
    the shell's convention for "terminated by that signal"."""

    def __init__(self, signum: int, iteration: int, checkpoint: str):
        super().__init__(128 + signum)
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint


class EvaluationStopped(SystemExit):
    """A stand-alone evaluation ended on a stop signal: no results were written."""

    def __init__(self, signum: int, what: str):
        super().__init__(128 + signum)
        self.signum, self.what = signum, what


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _in_main_thread() -> bool:
    # Python accepts signal handlers only there (a trainer run from a thread keeps the default).
    return threading.current_thread() is threading.main_thread()


def _any_rank(local: int, device: torch.device) -> int:
    """The largest value (here: signal precedence) of any rank (0: none); every rank takes the same
    decision."""
    flag = torch.tensor([float(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopOnSignal(HookBase):
    """Checkpoint and stop on ``signals`` at the end of the step in which any rank received one.

    Register it on every rank (the agreement is a collective) before the evaluation hook: a
    stopping run does not start an evaluation. A signal during an evaluation inside training is
    acted on when that evaluation has finished. ``signals`` (default: :func:`training_stop_signals`)
    are in ascending precedence: the run stops on the last-listed one that any rank received.
    """

    def __init__(self, checkpointer, signals=None):
        self.checkpointer = checkpointer
        self.signals = tuple(training_stop_signals() if signals is None else signals)
        self.received = 0
        self._previous = {}
        self._pid = os.getpid()

    def _precedence(self, signum: int) -> int:
        return self.signals.index(signum) + 1 if signum else 0

    def _record(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a loader worker forked with this handler: its rank acts on the signal
        if not self.received:
            logger.warning(
                "%s received at iteration %d: training stops after this step with a checkpoint",
                _signal_name(signum), self.trainer.iter,
            )
        if self._precedence(signum) >= self._precedence(self.received):
            self.received = signum

    def before_train(self):
        self._pid = os.getpid()
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._record) for s in self.signals}

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        # On every way out (end, stop, error): the loader workers ignore a first SIGTERM
        # (diffusiondet/data/resumable_loader.py), so they are shut down here, through
        # detectron2's public reset, rather than left to the interpreter's exit.
        step = getattr(self.trainer, "_trainer", None)
        if hasattr(step, "reset_data_loader"):
            loader = step.data_loader
            step.reset_data_loader(lambda: loader)

    def after_step(self):
        if comm.get_world_size() > 1:  # NCCL reduces on the GPU: the device of the weights
            device = next(self.trainer.model.parameters()).device
            precedence = _any_rank(self._precedence(self.received), device)
            signum = self.signals[precedence - 1] if precedence else 0
        else:
            signum = self.received
        iteration = self.trainer.iter
        if not signum or iteration + 1 >= self.trainer.max_iter:
            return  # the last step: the run ends normally and writes model_final
        name = f"model_{iteration:07d}"
        self.checkpointer.save(name, iteration=iteration)  # a collective on every rank
        comm.synchronize()  # no rank exits (and gets its siblings killed) before the file is written
        path = os.path.join(self.checkpointer.save_dir, f"{name}.pth")
        logger.warning(
            "%s: training stopped after iteration %d of %d; checkpoint %s written; continue with "
            "--resume (same command), which ends with the weights of an uninterrupted run",
            _signal_name(signum), iteration, self.trainer.max_iter, path,
        )
        raise TrainingStopped(signum, iteration, path)


def forward_stop_signals(signals=STOP_SIGNALS):
    """In a launcher process: pass each stop signal on to the worker processes it started (the
    ranks), which checkpoint and exit; the launcher then exits with their status."""

    def forward(signum, frame):
        children = multiprocessing.active_children()
        logger.warning("%s received: forwarding it to %d rank(s)", _signal_name(signum), len(children))
        for child in children:
            if child.pid is not None:
                os.kill(child.pid, signum)

    if _in_main_thread():
        for s in signals:
            signal.signal(s, forward)


@contextlib.contextmanager
def stop_signals_abort(what: str, signals=STOP_SIGNALS):
    """Within the block, a stop signal raises :class:`EvaluationStopped` naming ``what`` and
    saying that its results are lost. No-op outside the main thread, or when a training's
    :class:`StopOnSignal` handles the signal (the run stops after the evaluation, which then
    completes); any other handler is replaced within the block, then restored."""
    installed = {s: signal.getsignal(s) for s in signals}
    training = any(isinstance(getattr(h, "__self__", None), StopOnSignal) for h in installed.values())
    if not _in_main_thread() or training:
        yield
        return

    def abort(signum, frame):
        raise EvaluationStopped(signum, what)

    for s in signals:
        signal.signal(s, abort)
    try:
        yield
    except EvaluationStopped as stop:
        logger.error(
            "%s: %s stopped before it finished; no results were written (the inference done so "
            "far is lost): run it again", _signal_name(stop.signum), what,
        )
        raise
    finally:
        for s, handler in installed.items():
            signal.signal(s, handler)
