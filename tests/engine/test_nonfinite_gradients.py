"""A finite loss with a non-finite gradient is skipped like a non-finite loss, and a model with
non-finite weights is never written as a checkpoint."""
import os

import pytest
import torch
from torch import nn

from diffusiondet.engine import CheckpointError, DiffusionDetCheckpointer, SkipNonFiniteTrainer


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, batch):
        y = self.layer(batch)
        # 0 * sqrt(0): the value is 0, the gradient 0 * inf = NaN (when the batch asks for it).
        nan_grad = 0.0 * torch.sqrt((self.layer.weight * 0).sum()) if batch.sum() < 0 else y.new_zeros(())
        return {"loss": y.square().mean() + nan_grad}


def _trainer(batches, max_nonfinite_steps=10):
    from detectron2.utils.events import EventStorage

    model = _Toy()
    trainer = SkipNonFiniteTrainer(model, iter(batches), torch.optim.SGD(model.parameters(), lr=0.1),
                                   max_nonfinite_steps)
    return trainer, EventStorage(0)


def test_finite_loss_with_nan_gradient_skips_the_step_and_counts_it():
    good, bad = torch.ones(3, 4), -torch.ones(3, 4)
    trainer, storage = _trainer([bad, good])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with storage:
        trainer.iter = 0
        trainer.run_step()
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        assert trainer.nonfinite_steps == 1
        trainer.iter = 1
        trainer.run_step()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert not torch.equal(before["layer.weight"], trainer.model.layer.weight)


def test_nan_gradients_in_a_row_stop_training():
    bad = -torch.ones(3, 4)
    trainer, storage = _trainer([bad, bad], max_nonfinite_steps=1)
    with storage, pytest.raises(FloatingPointError, match="non-finite gradient.*MAX_NONFINITE_STEPS=1"):
        for it in range(2):
            trainer.iter = it
            trainer.run_step()


def test_a_non_finite_model_is_not_saved(tmp_path):
    model = _Toy()
    checkpointer = DiffusionDetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000")
    with torch.no_grad():
        model.layer.bias[1] = float("nan")
    with pytest.raises(CheckpointError, match=r"model_0000001\.pth has 1 non-finite.*layer\.bias"):
        checkpointer.save("model_0000001")
    assert not os.path.exists(tmp_path / "model_0000001.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
