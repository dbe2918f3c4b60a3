"""Training through the detectron2 Trainer: resume after a crash, and 2-process DDP (GLOO) on CPU
(where a NaN loss on one rank must make every rank skip that step)."""
import os
import socket
from datetime import timedelta

import pytest
import torch

from detectron2.engine import HookBase, launch
from detectron2.utils import comm

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.engine import DiffusionDetCheckpointer, SkipNonFiniteTrainer, Trainer
from tests.utils import tiny_cfg


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    json_file = generate_synthetic_crowd(
        root, split="train", num_images=6, image_size=(64, 64), min_objects=2, max_objects=8, seed=3
    )
    image_root = os.path.join(root, "train")
    register_coco_json("tiny_synthetic_train", json_file, image_root)
    return json_file, image_root


def _train_cfg(output_dir, max_iter, *extra):
    cfg = tiny_cfg(
        "DATASETS.TRAIN", ("tiny_synthetic_train",),
        "DATASETS.TEST", (),
        "SOLVER.MAX_ITER", max_iter,
        "SOLVER.CHECKPOINT_PERIOD", 2,
        "MODEL.DiffusionDet.NUM_CLASSES", 5,
        "OUTPUT_DIR", str(output_dir),
        *extra,
    )
    cfg.freeze()
    return cfg


class _Crash(HookBase):
    """Simulates a killed run: raises after ``at`` iterations have finished."""

    def __init__(self, at):
        self.at = at

    def after_step(self):
        if self.trainer.iter + 1 >= self.at:
            raise KeyboardInterrupt("simulated kill")


def test_resume_continues_from_saved_iteration(tiny_dataset, tmp_path):
    cfg = _train_cfg(tmp_path, 6)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    # The fault-tolerant parts are the ones in use (tests/engine/test_fault_tolerance.py).
    assert isinstance(trainer.checkpointer, DiffusionDetCheckpointer)
    assert isinstance(trainer._trainer, SkipNonFiniteTrainer)
    trainer.register_hooks([_Crash(at=3)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    # Checkpoint period 2: iteration index 1 was saved (model_0000001.pth); iterations 2.. are lost.
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000001.pth"
    saved = torch.load(os.path.join(tmp_path, "model_0000001.pth"), weights_only=False)

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, saved["model"][k])
    resumed.train()
    assert resumed.iter == cfg.SOLVER.MAX_ITER  # detectron2 leaves iter at max_iter after training
    assert os.path.exists(os.path.join(tmp_path, "model_final.pth"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nan_on_rank1_iter0(iteration, loss_dict):
    if comm.get_rank() == 1 and iteration == 0:
        return {**loss_dict, "loss_giou": loss_dict["loss_giou"] * float("nan")}
    return loss_dict


def _ddp_main(output_dir, json_file, image_root):
    register_coco_json("tiny_synthetic_train", json_file, image_root)
    cfg = _train_cfg(output_dir, 2)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {k: v.clone() for k, v in trainer.model.module.state_dict().items()}
    updated_at = []
    trainer.register_hooks([_RecordUpdates(initial, updated_at)])
    trainer.loss_hook = _nan_on_rank1_iter0
    trainer.train()
    assert comm.get_world_size() == 2
    # The NaN seen by rank 1 only made BOTH ranks skip iteration 0 (else DDP would hang or the
    # replicas would diverge); iteration 1 stepped normally.
    assert trainer.nonfinite_steps == 1
    assert updated_at == [False, True]
    # DDP keeps replicas identical: compare a head parameter across processes.
    param = next(trainer.model.module.head.parameters()).detach()
    gathered = comm.all_gather(param)
    assert torch.equal(gathered[0], gathered[1])
    assert torch.isfinite(param).all()


class _RecordUpdates(HookBase):
    """Records after each step whether a head weight differs from its initial value."""

    def __init__(self, initial, updated_at):
        self.key = next(k for k in initial if k.startswith("head.") and k.endswith("weight"))
        self.initial, self.updated_at = initial[self.key], updated_at

    def after_step(self):
        current = self.trainer.model.module.state_dict()[self.key]
        self.updated_at.append(not torch.equal(current, self.initial))


def test_two_process_training_with_launch(tiny_dataset, tmp_path):
    json_file, image_root = tiny_dataset
    launch(
        _ddp_main,
        num_gpus_per_machine=2,
        dist_url=f"tcp://127.0.0.1:{_free_port()}",
        args=(str(tmp_path), json_file, image_root),
        timeout=timedelta(seconds=90),  # a rank stuck in a collective fails the test, not hangs it
    )
    assert os.path.exists(os.path.join(tmp_path, "model_final.pth"))
