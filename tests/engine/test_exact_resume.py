"""Same command, same numbers: a seeded training run is reproducible to the bit, and a run
killed (SIGKILL, whole process group) and resumed with ``--resume`` ends with the weights of the
uninterrupted run, on 1 and 2 processes (GLOO) with loader workers."""
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from detectron2.engine import HookBase

from diffusiondet.engine import Trainer
from tests.utils import TINY_OPTS, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
# Bit-identity must hold whatever kernels the CPU picks: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics

MAX_ITER, PERIOD = 6, 2  # checkpoints after iterations 1, 3 and 5 (the last one is model_final)


def _cfg(output_dir, *extra):
    cfg = tiny_cfg(
        "DATASETS.TRAIN", ("resume_tiny_train",), "DATASETS.TEST", (), "MODEL.DiffusionDet.NUM_CLASSES", 5,
        "SOLVER.MAX_ITER", MAX_ITER, "SOLVER.CHECKPOINT_PERIOD", PERIOD, "DATALOADER.NUM_WORKERS", 1,
        "SEED", 11, "OUTPUT_DIR", str(output_dir), *extra,
    )  # fmt: skip
    cfg.freeze()
    return cfg


class _Interrupt(HookBase):
    def __init__(self, after_iter):
        self.after_iter = after_iter

    def after_step(self):
        if self.trainer.iter == self.after_iter:
            raise KeyboardInterrupt("simulated kill")


def _train(cfg, resume=False, interrupt_after=None):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    if interrupt_after is not None:
        trainer.register_hooks([_Interrupt(interrupt_after)])
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights(tiny_data, tmp_path):
    first = _train(_cfg(tmp_path / "a"))
    assert _equal(first, _train(_cfg(tmp_path / "b")))
    assert not _equal(first, _train(_cfg(tmp_path / "c", "SEED", 12)))


def test_evaluation_during_training_does_not_change_the_trajectory(tiny_data, tmp_path):
    plain = _train(_cfg(tmp_path / "plain"))
    evaluated = _train(_cfg(tmp_path / "eval", "DATASETS.TEST", ("resume_tiny_train",), "TEST.EVAL_PERIOD", 2,
                            "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 10))  # fmt: skip
    assert _equal(plain, evaluated)


def test_resume_in_process_equals_the_uninterrupted_run(tiny_data, tmp_path):
    straight = _train(_cfg(tmp_path / "straight"))
    cut = tmp_path / "cut"
    interrupted = _train(_cfg(cut), interrupt_after=4)  # last checkpoint: after iteration 3
    assert not _equal(straight, interrupted)
    checkpoint = torch.load(cut / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert checkpoint["data_position"] == 4 and len(checkpoint["rng_states"]) == 1
    assert _equal(straight, _train(_cfg(cut), resume=True))


def test_old_checkpoint_without_run_state_resumes_with_a_warning(tiny_data, tmp_path, caplog):
    _train(_cfg(tmp_path), interrupt_after=2)  # checkpoint after iteration 1
    path = tmp_path / "model_0000001.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint["rng_states"], checkpoint["data_position"]
    torch.save(checkpoint, path)
    trainer = Trainer(_cfg(tmp_path))
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    assert trainer.data_loader.batch_sampler.start_batch == 2  # one batch per iteration
    assert "model_0000001.pth has no RNG states or data position" in caplog.text
    assert "trajectory will differ" in caplog.text


def _job(tmp_path, data, output, world, *prefix, resume=False):
    json_file, image_root = data
    opts = [*map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5", "DATASETS.TEST", "()",
            "DATASETS.CUSTOM.TRAIN_JSON", json_file, "DATASETS.CUSTOM.TRAIN_IMAGES", image_root,
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
            "DATALOADER.NUM_WORKERS", "1", "SEED", "11", "OUTPUT_DIR", str(tmp_path / output)]  # fmt: skip
    script = prefix or (os.path.join(REPO, "tools", "train_net.py"),)
    cmd = [sys.executable, *script, "--config-file", CONFIG, "--num-gpus", str(world),
           *(["--resume"] if resume else []), *opts]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own: the kill takes the job's process group, as a scheduler would.
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_data, straight_run, tmp_path, world):
    killed = _job(tmp_path, tiny_data, "killed", world, "-m", "tests.engine.killed_training", "--kill-after", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = tmp_path / "killed"
    assert (out / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (out / "model_final.pth").exists()
    state = torch.load(out / "model_0000003.pth", map_location="cpu", weights_only=True)
    assert len(state["rng_states"]) == world and state["data_position"] == 4
    resumed = _job(tmp_path, tiny_data, "killed", world, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Starting training from iteration 4" in resumed.stderr + resumed.stdout
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert _equal(final, straight_run(world))
