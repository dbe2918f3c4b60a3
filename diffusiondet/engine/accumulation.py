"""Gradient accumulation (SOLVER.ACCUMULATE_STEPS = k): one trainer iteration, one optimizer step,
k micro-batches of SOLVER.IMS_PER_BATCH images (docs/training_extras.md, "Gradient accumulation").

Each micro-batch's losses are normalised as the criterion normalises one process's batch (by that
batch's positive queries, per stage; diffusiondet/modeling/criterion.py) and scaled by 1/k, and the
gradients add up: the step is the one of a DDP run with k times the processes, each taking one
micro-batch (DDP averages the processes' gradients the same way). A k = 1 step is the plain one.

* :func:`micro_step_sync`: DDP all-reduces the gradients only in the last micro-step;
* :func:`mean_loss_dict`: the logged losses of a step, the mean over its micro-batches;
* :class:`AccumulatingAMPTrainer`: detectron2's AMPTrainer with k micro-batches per step (the
  non-AMP step, with non-finite skipping, is :class:`~.train_loop.SkipNonFiniteTrainer`).
"""
import contextlib
import time
from typing import Dict, List

import torch

from detectron2.engine import AMPTrainer
from detectron2.utils.events import get_event_storage

__all__ = ["AccumulatingAMPTrainer", "MicroBatches", "mean_loss_dict", "micro_step_sync"]


def micro_step_sync(model: torch.nn.Module, last: bool):
    """Context for the forward and backward of one micro-step: ``model.no_sync()`` (DDP: the
    gradients stay local, no all-reduce) unless ``last``, whose backward all-reduces the sum of
    all micro-steps' gradients at once. Models without ``no_sync`` (one process) get a no-op."""
    no_sync = getattr(model, "no_sync", None)
    if last or no_sync is None:
        return contextlib.nullcontext()
    return no_sync()


class MicroBatches:
    """The k micro-batches of one optimizer step of ``trainer`` (a SimpleTrainer with a
    ``batches_consumed`` count): iterating takes them from its loader one at a time and yields
    ``(micro, data, sync)`` with ``sync`` the :func:`micro_step_sync` context of that micro-step;
    ``data_time`` adds up the seconds spent waiting for the loader. Leaving the loop early leaves
    the rest in the loader."""

    def __init__(self, trainer, k: int):
        self.trainer, self.k, self.data_time = trainer, k, 0.0

    def __iter__(self):
        for micro in range(self.k):
            start = time.perf_counter()
            data = next(self.trainer._data_loader_iter)
            self.trainer.batches_consumed += 1
            self.data_time += time.perf_counter() - start
            yield micro, data, micro_step_sync(self.trainer.model, last=micro == self.k - 1)


def mean_loss_dict(loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per key, the mean of the micro-batches' detached scalar losses (k dicts -> one dict): the
    losses of the step, logged as detectron2 logs the mean over processes."""
    if len(loss_dicts) == 1:
        return loss_dicts[0]
    return {k: torch.stack([d[k] for d in loss_dicts]).mean() for k in loss_dicts[0]}


class AccumulatingAMPTrainer(AMPTrainer):
    """AMPTrainer whose step takes ``accumulate_steps`` micro-batches (SOLVER.AMP.ENABLED and
    SOLVER.ACCUMULATE_STEPS > 1).

    Every micro-batch's ``scale(loss / k)`` is back-propagated under the same loss scale; the
    GradScaler unscales, checks for inf/NaN, steps and updates its scale once per optimizer step
    (PyTorch's documented accumulation pattern). As in detectron2's AMPTrainer, a step with
    inf/NaN gradients is skipped by the GradScaler, and a non-finite logged loss raises
    FloatingPointError (SOLVER.MAX_NONFINITE_STEPS is not used with AMP). ``batches_consumed``
    counts micro-batches: the data position that the trainer's checkpoints store (Trainer.run_state).

    Autocast runs on the device type of the model's parameters (detectron2 assumes CUDA).
    """

    def __init__(self, model, data_loader, optimizer, accumulate_steps: int, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.accumulate_steps = accumulate_steps
        self.batches_consumed = 0

    @classmethod
    def from_amp_trainer(cls, step: AMPTrainer, accumulate_steps: int) -> "AccumulatingAMPTrainer":
        """The same model, loader, optimizer, GradScaler and precision as ``step``."""
        return cls(
            step.model, step.data_loader, step.optimizer, accumulate_steps,
            grad_scaler=step.grad_scaler, precision=step.precision, log_grad_scaler=step.log_grad_scaler,
        )  # fmt: skip

    def run_step(self):
        assert self.model.training, "[AccumulatingAMPTrainer] model was changed to eval mode!"
        device_type = next(self.model.parameters()).device.type
        k = self.accumulate_steps
        self.optimizer.zero_grad()
        loss_dicts, steps = [], MicroBatches(self, k)
        for _, data, sync in steps:
            with sync:
                with torch.autocast(device_type, dtype=self.precision):
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values())
                self.grad_scaler.scale(losses / k).backward()
            loss_dicts.append({name: v.detach() for name, v in loss_dict.items()})
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        self._write_metrics(mean_loss_dict(loss_dicts), steps.data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
