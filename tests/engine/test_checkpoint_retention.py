"""Checkpoint retention (SOLVER.CHECKPOINT_MAX_KEEP, docs/training_extras.md): the newest periodic
files are kept, model_final.pth is never duplicated by a periodic file of the last iteration, a
resumed run also counts the files of the run it continues (the SIGTERM checkpoint included), and
only the process that writes checkpoints deletes."""
import os
import signal

import pytest
import torch
from torch import nn

from detectron2.engine import HookBase

from diffusiondet.engine import DiffusionDetCheckpointer, Trainer
from diffusiondet.engine.checkpoint_retention import RetainingPeriodicCheckpointer
from diffusiondet.engine.stop_signal import StopOnSignal, TrainingStopped
from tests.engine.test_exact_resume import _cfg, _equal, _train


def _files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".pth"))


@pytest.mark.parametrize(
    "keep, expected",
    [
        (1, ["model_0000003.pth", "model_final.pth"]),
        (0, ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]),  # 0 keeps all
    ],
)
def test_newest_periodic_files_are_kept_and_the_final_is_not_duplicated(tiny_data, tmp_path, keep, expected):
    # 6 iterations, period 2: periodic saves after iterations 1 and 3; iteration 5 is the last,
    # where detectron2 would write model_0000005.pth and model_final.pth, the same weights.
    _train(_cfg(tmp_path, "SOLVER.CHECKPOINT_MAX_KEEP", keep))
    assert _files(tmp_path) == expected
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5 and final["data_position"] == 6


class _SigtermBefore(HookBase):
    """Acts as if SIGTERM arrived during iteration ``at``: StopOnSignal then checkpoints and stops."""

    def __init__(self, at):
        self.at = at

    def before_step(self):
        if self.trainer.iter == self.at:
            next(h for h in self.trainer._hooks if isinstance(h, StopOnSignal)).received = signal.SIGTERM


def test_a_resumed_run_keeps_max_keep_files_counting_the_stop_checkpoint(tiny_data, tmp_path):
    opts = ("SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_MAX_KEEP", 1)
    straight = _train(_cfg(tmp_path / "straight", *opts))
    assert _files(tmp_path / "straight") == ["model_0000007.pth", "model_final.pth"]
    out = tmp_path / "stopped"
    trainer = Trainer(_cfg(out, *opts))
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_SigtermBefore(4)])
    with pytest.raises(TrainingStopped):
        trainer.train()
    # Periodic 1 gave way to 3; the stop checkpoint (iteration 4) is not counted by the run that
    # writes it: it is the file a resumed run starts from.
    assert _files(out) == ["model_0000003.pth", "model_0000004.pth"]
    resumed = Trainer(_cfg(out, *opts))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5
    resumed.train()
    # The resumed run counted 3 and 4 with its own 5 and 7: one periodic file left, as straight.
    assert _files(out) == ["model_0000007.pth", "model_final.pth"]
    assert _equal(straight, {k: v.detach() for k, v in resumed.model.state_dict().items()})


def test_only_the_writing_process_deletes(tmp_path):
    checkpointer = DiffusionDetCheckpointer(nn.Linear(2, 2), str(tmp_path))
    assert RetainingPeriodicCheckpointer(checkpointer, 2, max_to_keep=3).max_to_keep == 3
    assert RetainingPeriodicCheckpointer(checkpointer, 2, max_to_keep=0).max_to_keep is None
    checkpointer.save_to_disk = False  # a rank other than the main one
    assert RetainingPeriodicCheckpointer(checkpointer, 2, max_to_keep=3).max_to_keep is None
