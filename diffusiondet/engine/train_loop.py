"""The training step: a non-finite loss or gradient skips one optimizer step instead of ending the
run (or, worse, reaching the weights: a finite loss can have a NaN gradient, e.g. 0 * sqrt(0))."""
import logging

import torch
import torch.distributed as dist

from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .accumulation import MicroBatches, mean_loss_dict

logger = logging.getLogger(__name__)


def ranks_with_nonfinite(local_nonfinite: bool, device: torch.device) -> int:
    """How many ranks saw a non-finite loss: every rank must take the same decision, or the ranks
    that step would wait forever in DDP's gradient all-reduce for the ones that skip."""
    if comm.get_world_size() == 1:
        return int(local_nonfinite)
    flag = torch.tensor([float(local_nonfinite)], device=device)
    dist.all_reduce(flag)
    return int(flag.item())


class SkipNonFiniteTrainer(SimpleTrainer):
    """SimpleTrainer that skips (and counts) the optimizer step of a NaN or infinite loss, or of a
    finite loss whose gradient is not finite (checked after backward through the total gradient
    norm, agreed on by all ranks).

    detectron2 raises FloatingPointError at the first non-finite loss, so one degenerate batch
    ends a multi-day run. Here that step is skipped on every rank (no NaN reaches the weights or
    the optimizer state), a warning names the iteration and the losses, the ``nonfinite_steps``
    scalar counts the skipped steps of the run (saved in checkpoints), and only more than
    ``max_nonfinite_steps`` in a row (a diverged model, not a bad batch) stop training with
    FloatingPointError naming SOLVER.MAX_NONFINITE_STEPS.

    A step takes ``accumulate_steps`` (SOLVER.ACCUMULATE_STEPS) micro-batches, each loss scaled
    by 1/k, the gradients summed (all-reduced in the last micro-step only, accumulation.py); a
    non-finite loss in any micro-batch, or a non-finite gradient of the sum, skips the whole step.

    ``loss_hook`` is a test hook (None in normal runs): ``loss_hook(iteration, loss_dict)`` is
    called after each micro-batch's forward pass and returns the loss dict to use. The fault drill
    and the tests inject NaN losses through it (set it through ``Trainer.loss_hook``).
    Unlike SimpleTrainer, gradients are always zeroed before the first forward and metrics are
    written synchronously (DefaultTrainer uses neither option).
    """

    def __init__(self, model, data_loader, optimizer, max_nonfinite_steps: int = 10, accumulate_steps: int = 1):
        super().__init__(model, data_loader, optimizer)
        self.max_nonfinite_steps = max_nonfinite_steps
        self.accumulate_steps = accumulate_steps
        self.loss_hook = None
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0
        # Batches taken from the loader, skipped steps included: the loader position that the
        # trainer's checkpoints store and a resumed run continues from (Trainer.resume_or_load).
        self.batches_consumed = 0

    def run_step(self):
        assert self.model.training, "[SkipNonFiniteTrainer] model was changed to eval mode!"
        k = self.accumulate_steps
        self.optimizer.zero_grad()
        loss_dicts, steps = [], MicroBatches(self, k)
        for micro, data, sync in steps:
            with sync:
                loss_dict = self.model(data)
                if isinstance(loss_dict, torch.Tensor):
                    loss_dict = {"total_loss": loss_dict}
                if self.loss_hook is not None:
                    loss_dict = self.loss_hook(self.iter, loss_dict)
                losses = sum(loss_dict.values())
                bad = {name: v.detach() for name, v in loss_dict.items() if not torch.isfinite(v).all()}
                if not bad and not torch.isfinite(losses):
                    bad = {"sum of the losses": losses.detach()}  # finite terms that overflow together
                ranks = ranks_with_nonfinite(bool(bad), losses.device)
                if ranks:
                    # No backward either: every rank skips it, so DDP's all-reduces stay matched.
                    self.optimizer.zero_grad()  # earlier micro-batches' gradients
                    self._drop_batches(k - 1 - micro)
                    self._skip(bad, ranks)
                    return
                (losses / k if k > 1 else losses).backward()
            loss_dicts.append({name: v.detach() for name, v in loss_dict.items()})
        self.after_backward()
        # One number for all gradients; NaN/inf when any gradient is (or when their norm
        # overflows, which a step would not survive either). Every rank takes the same decision.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else losses.new_zeros(())
        ranks = ranks_with_nonfinite(not bool(torch.isfinite(grad_norm)), losses.device)
        if ranks:
            self.optimizer.zero_grad()  # the NaN gradients must not reach the optimizer state
            self._skip({"gradient norm": grad_norm.detach()}, ranks, kind="gradient")
            return
        self._nonfinite_in_a_row = 0
        self._write_metrics(mean_loss_dict(loss_dicts), steps.data_time)
        get_event_storage().put_scalar("nonfinite_steps", self.nonfinite_steps, smoothing_hint=False)
        self.optimizer.step()

    def _drop_batches(self, count: int) -> None:
        """Take the rest of a skipped step's micro-batches from the loader, unused: iteration i
        always uses batches k*i .. k*i + k - 1, whatever was skipped before."""
        for _ in range(count):
            next(self._data_loader_iter)
            self.batches_consumed += 1

    def _skip(self, bad, ranks, kind="loss"):
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        get_event_storage().put_scalar("nonfinite_steps", self.nonfinite_steps, smoothing_hint=False)
        what = ", ".join(f"{k}={v.float().mean().item()}" for k, v in bad.items()) or "on another rank"
        where = f" on {ranks} of {comm.get_world_size()} ranks" if comm.get_world_size() > 1 else ""
        if self._nonfinite_in_a_row > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"non-finite {kind} at iteration {self.iter} ({what}){where}: "
                f"{self._nonfinite_in_a_row} in a row exceeds SOLVER.MAX_NONFINITE_STEPS="
                f"{self.max_nonfinite_steps}; training stopped (lower SOLVER.BASE_LR, enable "
                "SOLVER.CLIP_GRADIENTS or check the data)"
            )
        logger.warning(
            "non-finite %s at iteration %d (%s)%s: optimizer step skipped (%d in a row, %d in "
            "this run; SOLVER.MAX_NONFINITE_STEPS=%d)",
            kind, self.iter, what, where, self._nonfinite_in_a_row, self.nonfinite_steps,
            self.max_nonfinite_steps,
        )

    def state_dict(self):
        ret = super().state_dict()
        ret["nonfinite_steps"] = self.nonfinite_steps
        ret["nonfinite_in_a_row"] = self._nonfinite_in_a_row
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Absent in older checkpoints (the trainer then warns that the trajectory will differ).
        self.nonfinite_steps = state_dict.get("nonfinite_steps", 0)
        self._nonfinite_in_a_row = state_dict.get("nonfinite_in_a_row", 0)
