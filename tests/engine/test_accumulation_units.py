"""Gradient accumulation on a toy model: which micro-steps DDP would all-reduce in, the 1/k mean
of differently normalised micro-batches, and one GradScaler step and scale update per optimizer
step (AMP); the Trainer picks the accumulating step for SOLVER.ACCUMULATE_STEPS > 1."""
import contextlib

import pytest
import torch
from torch import nn

from detectron2.engine import AMPTrainer
from detectron2.utils.events import EventStorage

from diffusiondet.engine import SkipNonFiniteTrainer
from diffusiondet.engine.accumulation import AccumulatingAMPTrainer
from tests.engine.accumulation_data import FixedDataTrainer, fixed_cfg

# Micro-batches of 2, 5 and 3 rows: each loss is a mean over its own rows (normalised per
# micro-batch, like the criterion's losses).
ROWS = (2, 5, 3)


class _Toy(nn.Module):
    """A linear layer; records, per forward, whether gradients would be all-reduced (DDP's
    ``require_backward_grad_sync``, switched off by ``no_sync``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 3)
        self.sync, self.synced = True, []

    @contextlib.contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def forward(self, x):
        self.synced.append(self.sync)
        return {"loss": self.layer(x).square().mean()}


def _batches(inf_at=None):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 4, generator=g) for n in ROWS]
    if inf_at is not None:
        batches[inf_at][0, 0] = float("inf")
    return batches


def _mean_gradient(model, batches):
    """float32 reference: the mean of the micro-batches' gradients."""
    grads = []
    for x in batches:
        model.zero_grad()
        model.layer(x).square().mean().backward()
        grads.append(model.layer.weight.grad.clone())
    return torch.stack(grads).mean(0)


def test_plain_step_averages_the_micro_batches_and_syncs_only_the_last():
    model = _Toy()
    expected = model.layer.weight.detach() - 0.1 * _mean_gradient(model, _batches())
    trainer = SkipNonFiniteTrainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1),
                                   accumulate_steps=3)  # fmt: skip
    model.synced.clear()
    with EventStorage(0):
        trainer.run_step()
    assert model.synced == [False, False, True]
    assert trainer.batches_consumed == 3
    torch.testing.assert_close(model.layer.weight.detach(), expected)


def _amp_trainer(model, batches):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    return AccumulatingAMPTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), 3,
                                  grad_scaler=scaler, precision=torch.bfloat16)  # fmt: skip


def test_amp_step_averages_the_micro_batches_and_steps_the_scaler_once():
    model = _Toy()
    before = model.layer.weight.detach().clone()
    expected = before - 0.1 * _mean_gradient(model, _batches())
    trainer = _amp_trainer(model, _batches())
    model.synced.clear()
    with EventStorage(0):
        trainer.run_step()
    assert model.synced == [False, False, True]
    assert trainer.batches_consumed == 3
    # bfloat16 matmuls: about 3 significant digits; a missing 1/k would be off by 3x.
    torch.testing.assert_close(model.layer.weight.detach(), expected, rtol=0, atol=2e-3)
    assert (model.layer.weight.detach() - before).abs().max() > 2e-2
    assert trainer.grad_scaler.get_scale() == 2.0**9  # one update (growth_interval 1), not 3


def test_amp_step_with_an_inf_micro_batch_is_skipped_and_the_scale_halved_once():
    model = _Toy()
    before = model.layer.weight.detach().clone()
    trainer = _amp_trainer(model, _batches(inf_at=1))
    with EventStorage(0), pytest.raises(FloatingPointError, match="Loss became infinite or NaN"):
        trainer.run_step()  # detectron2 refuses a non-finite logged loss, as its AMPTrainer does
    assert trainer.batches_consumed == 3
    # A non-finite gradient alone (finite logged loss): the GradScaler skips the step.
    trainer._write_metrics = lambda *args, **kwargs: None
    trainer._data_loader_iter_obj = iter(_batches(inf_at=2))
    with EventStorage(0):
        trainer.run_step()
    assert torch.equal(model.layer.weight.detach(), before)
    assert trainer.grad_scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("amp, steps, expected", [
    (False, 2, SkipNonFiniteTrainer), (True, 2, AccumulatingAMPTrainer), (True, 1, AMPTrainer),
])  # fmt: skip
def test_trainer_picks_the_step_of_the_config(tmp_path, amp, steps, expected):
    cfg = fixed_cfg(tmp_path, 2, steps, "SOLVER.AMP.ENABLED", amp)
    step = FixedDataTrainer(cfg)._trainer
    assert type(step) is expected
    assert getattr(step, "accumulate_steps", 1) == steps
