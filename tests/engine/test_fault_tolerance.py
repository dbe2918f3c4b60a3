"""Atomic checkpoints, weights that do not fit the model, and skipped non-finite losses."""
import errno
import io
import logging
import os

import pytest
import torch
import torchvision
from torch import nn

from detectron2.engine import HookBase
from detectron2.modeling import build_model

from diffusiondet.engine import CheckpointError, DiffusionDetCheckpointer, SkipNonFiniteTrainer
from diffusiondet.engine import checkpoint as checkpoint_module
from tests.utils import tiny_cfg


class _Toy(nn.Module):
    """Stands in for the detector: the checkpointer and the step logic only see a module."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.class_logits = nn.Linear(4, classes)

    def forward(self, batch):
        y = self.class_logits(self.backbone(batch))
        return {"loss_a": y.square().mean(), "loss_b": y.abs().mean()}


def _torch_save_aborting_half_way(error):
    """torch.save that writes half of the real bytes, then fails like a kill or a full disk."""
    real_save = torch.save

    def save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        raise error

    return save


def _saved(tmp_path, name="model_final"):
    return torch.load(os.path.join(tmp_path, f"{name}.pth"), weights_only=False)["model"]


def test_aborted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _Toy()
    checkpointer = DiffusionDetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_final")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.backbone.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _torch_save_aborting_half_way(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")  # overwriting the same name, as a rerun of a finished job does
    monkeypatch.undo()
    for k, v in _saved(tmp_path).items():
        torch.testing.assert_close(v, before[k])
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]  # no torn/temp file
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"


def test_aborted_write_of_a_new_name_leaves_no_file_under_that_name(tmp_path, monkeypatch):
    checkpointer = DiffusionDetCheckpointer(_Toy(), str(tmp_path))
    checkpointer.save("model_0000000")
    monkeypatch.setattr(torch, "save", _torch_save_aborting_half_way(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000001")
    assert not os.path.exists(os.path.join(tmp_path, "model_0000001.pth"))
    assert checkpointer.get_checkpoint_file() == os.path.join(tmp_path, "model_0000000.pth")


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    # A hard kill (no exception handler runs) leaves the temporary file of atomic_write behind.
    checkpointer = DiffusionDetCheckpointer(_Toy(), str(tmp_path))
    leftovers = [".model_0000001.pth.abc123.tmp", ".last_checkpoint.xyz.tmp"]
    for name in leftovers + [".other.pth.q.tmp"]:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    checkpointer.save("model_0000001")
    assert sorted(os.listdir(tmp_path)) == [".other.pth.q.tmp", "last_checkpoint", "model_0000001.pth"]


def test_fed_loss_weights_of_another_class_count_fine_tune(tmp_path, caplog):
    source = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 3, "MODEL.DiffusionDet.USE_FED_LOSS", True)
    path = os.path.join(tmp_path, "fed3.pth")
    torch.save({"model": source.state_dict()}, path)
    target = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 5, "MODEL.DiffusionDet.USE_FED_LOSS", True)
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        DiffusionDetCheckpointer(target).resume_or_load(path, resume=False)
    assert "criterion.fed_loss_cls_weights (3,) vs (5,)" in caplog.text
    torch.testing.assert_close(target.state_dict()["head.time_mlp.1.weight"],
                               source.state_dict()["head.time_mlp.1.weight"])


def test_full_disk_names_the_path_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _Toy()
    checkpointer = DiffusionDetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000000")
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", _torch_save_aborting_half_way(full))
    with pytest.raises(OSError) as info:
        checkpointer.save("model_0000001")
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert os.path.join(tmp_path, "model_0000001.pth") in message
    assert "No space left on device" in message and "model_0000000.pth is intact" in message
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]  # space given back
    torch.testing.assert_close(_saved(tmp_path, "model_0000000")["backbone.weight"], model.backbone.weight)


def test_failed_last_checkpoint_write_keeps_the_old_tag(tmp_path, monkeypatch):
    checkpointer = DiffusionDetCheckpointer(_Toy(), str(tmp_path))
    checkpointer.save("model_0000000")
    real_atomic_write = checkpoint_module.atomic_write

    def failing(path, write):
        def half(f):
            f.write(b"mod")
            raise OSError(errno.EIO, "Input/output error")

        real_atomic_write(path, half)

    monkeypatch.setattr(checkpoint_module, "atomic_write", failing)
    with pytest.raises(OSError, match=f"could not write checkpoint {tmp_path}/last_checkpoint"):
        checkpointer.tag_last_checkpoint("model_0000001.pth")
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read() == "model_0000000.pth"


def test_atomic_write_leaves_the_old_content_on_failure(tmp_path):
    path = os.path.join(tmp_path, "last_checkpoint")
    checkpoint_module.atomic_write(path, lambda f: f.write(b"model_0000001.pth"))

    def fail(f):
        f.write(b"mod")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError):
        checkpoint_module.atomic_write(path, fail)
    with open(path) as f:
        assert f.read() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_missing_and_truncated_weights_name_the_file(tmp_path):
    checkpointer = DiffusionDetCheckpointer(_Toy())
    missing = os.path.join(tmp_path, "nope.pth")
    with pytest.raises(FileNotFoundError, match=missing):
        checkpointer.resume_or_load(missing, resume=False)
    torch.save({"model": _Toy().state_dict()}, os.path.join(tmp_path, "full.pth"))
    with open(os.path.join(tmp_path, "full.pth"), "rb") as f:
        data = f.read()
    truncated = os.path.join(tmp_path, "truncated.pth")
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*truncated.pth: it is truncated"):
        checkpointer.resume_or_load(truncated, resume=False)


def _tiny_model(*opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


def test_other_hidden_dim_is_an_error_listing_keys_and_shapes(tmp_path):
    path = os.path.join(tmp_path, "hidden32.pth")
    torch.save({"model": _tiny_model().state_dict()}, path)
    wider = _tiny_model("MODEL.DiffusionDet.HIDDEN_DIM", 64, "MODEL.FPN.OUT_CHANNELS", 64)
    with pytest.raises(CheckpointError) as info:
        DiffusionDetCheckpointer(wider).resume_or_load(path, resume=False)
    message = str(info.value)
    assert path in message and "another architecture" in message
    assert "backbone.fpn_lateral2.weight (32, 64, 1, 1) vs (64, 64, 1, 1)" in message


def test_torchvision_classifier_is_an_error_listing_keys(tmp_path):
    path = os.path.join(tmp_path, "resnet18.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        DiffusionDetCheckpointer(_tiny_model()).resume_or_load(path, resume=False)
    message = str(info.value)
    assert "fits none of the model's" in message and "conv1.weight (64, 3, 7, 7)" in message
    assert "backbone.fpn_lateral2.weight (32, 64, 1, 1)" in message


def test_other_num_classes_fine_tunes_with_a_warning(tmp_path, caplog):
    source = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 3)
    path = os.path.join(tmp_path, "three_classes.pth")
    torch.save({"model": source.state_dict()}, path)
    target = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 7)
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        DiffusionDetCheckpointer(target).resume_or_load(path, resume=False)
    assert "head.head_series.0.class_logits.weight (3, 32) vs (7, 32)" in caplog.text
    loaded, expected = target.state_dict(), source.state_dict()
    for k, v in expected.items():
        if "class_logits" not in k:
            torch.testing.assert_close(loaded[k], v)


def test_backbone_only_checkpoint_still_loads(tmp_path):
    source = _tiny_model()
    path = os.path.join(tmp_path, "backbone.pth")
    backbone = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.bottom_up.")}
    torch.save({"model": backbone}, path)
    target = _tiny_model("SEED", 1)
    DiffusionDetCheckpointer(target).resume_or_load(path, resume=False)
    for k, v in backbone.items():
        torch.testing.assert_close(target.state_dict()[k], v)


def _step_trainer(loss_hook, max_nonfinite_steps):
    torch.manual_seed(0)
    model = _Toy()
    data = iter(lambda: torch.randn(8, 4), None)
    trainer = SkipNonFiniteTrainer(model, data, torch.optim.SGD(model.parameters(), lr=0.1), max_nonfinite_steps)
    trainer.loss_hook = loss_hook
    return trainer


def _nan_at(*iterations):
    def hook(iteration, loss_dict):
        if iteration in iterations:
            return {**loss_dict, "loss_b": loss_dict["loss_b"] * float("inf")}
        return loss_dict

    return hook


class _Snapshot(HookBase):
    def __init__(self, weights):
        self.weights = weights

    def after_step(self):
        self.weights.append(self.trainer.model.backbone.weight.detach().clone())


def test_nonfinite_loss_skips_the_step_and_is_counted(caplog):
    trainer = _step_trainer(_nan_at(1), max_nonfinite_steps=2)
    weights = []
    trainer.register_hooks([_Snapshot(weights)])
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        trainer.train(0, 4)
    assert torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.nonfinite_steps == 1
    assert [v for v, _ in trainer.storage.history("nonfinite_steps").values()] == [0, 1, 1, 1]
    assert "non-finite loss at iteration 1 (loss_b=inf)" in caplog.text
    assert trainer.state_dict()["nonfinite_steps"] == 1


@pytest.mark.parametrize("limit, stop_at", [(2, 3), (0, 1)])
def test_too_many_nonfinite_steps_in_a_row_stop_training(limit, stop_at):
    trainer = _step_trainer(_nan_at(1, 2, 3, 4), max_nonfinite_steps=limit)
    with pytest.raises(FloatingPointError, match=f"SOLVER.MAX_NONFINITE_STEPS={limit}") as info:
        trainer.train(0, 6)
    assert f"at iteration {stop_at}" in str(info.value)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_dist_timeout_reaches_launch(monkeypatch):
    import importlib.util
    import sys
    from datetime import timedelta

    path = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "train_net.py")
    spec = importlib.util.spec_from_file_location("train_net_under_test", path)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    calls, forwarded = [], []
    monkeypatch.setattr(train_net, "launch", lambda *args, **kwargs: calls.append(kwargs))
    # The launcher of several processes forwards SIGTERM to its ranks (recorded here, not
    # installed: the handler would outlive the test in this process).
    monkeypatch.setattr(train_net, "forward_stop_signals", lambda: forwarded.append(True))
    for argv, timeout in [([], timedelta(minutes=30)), (["--dist-timeout", "0.5"], timedelta(seconds=30))]:
        monkeypatch.setattr(sys, "argv", ["train_net.py", "--num-gpus", "2", *argv])
        train_net.invoke_main()
        assert calls[-1]["timeout"] == timeout
    assert forwarded == [True, True]
    monkeypatch.setattr(sys, "argv", ["train_net.py", "--num-gpus", "1"])
    train_net.invoke_main()
    assert forwarded == [True, True]  # one process: its trainer handles the signal itself
