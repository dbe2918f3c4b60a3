"""Model EMA (MODEL_EMA.*, diffusiondet/engine/ema.py): the update rule, skipped steps, the
official ``ema_state`` checkpoint entry, exact resume, evaluation on the EMA weights with the raw
ones put back, and stand-alone evaluation of either set of weights."""
import importlib.util
import logging
import math
import os
import shutil

import pytest
import torch
from torch import nn

from detectron2.engine import HookBase
from detectron2.engine.hooks import EvalHook

from diffusiondet.engine import CheckpointError, DiffusionDetCheckpointer, Trainer, argument_parser, load_model_weights
from diffusiondet.engine import ema as ema_module
from diffusiondet.engine.ema import ModelEMA, add_model_ema, named_tensors
from tests.engine.test_exact_resume import _Interrupt
from tests.utils import TINY_OPTS, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
# Bit-identity of resumed runs must hold whatever kernels the CPU picks (AVX2 rerun).
pytestmark = pytest.mark.numerics


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)  # a 3 x 2 weight: rows and columns cannot be swapped unseen
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def fill(self, value):
        with torch.no_grad():
            for t in (self.linear.weight, self.linear.bias, self.running):
                t.fill_(value)
            self.count.fill_(int(value))
        return self


def _values(ema):
    """{name: the single value every element of that EMA tensor holds}."""
    state = ema.state_dict()
    assert all(torch.all(t == t.flatten()[0]) for t in state.values())
    return {k: float(t.flatten()[0]) for k, t in state.items()}


def test_constant_decay_matches_the_hand_computed_average():
    model = _Tiny().fill(1.0)
    ema = ModelEMA(model, decay=0.9)
    ema.start(model, iteration=0)  # the average starts from the weights training starts with
    ema.update(model.fill(3.0))
    assert _values(ema)["linear.weight"] == pytest.approx(0.9 * 1 + 0.1 * 3, abs=1e-6)  # 1.2
    ema.update(model.fill(-1.0))
    values = _values(ema)
    for name in ("linear.weight", "linear.bias", "running"):  # buffers are averaged too
        assert values[name] == pytest.approx(0.98, abs=1e-6)  # 0.9 * 1.2 + 0.1 * (-1)
    assert ema.num_updates == 2
    assert list(ema.state_dict()) == ["linear.weight", "linear.bias", "running", "count"]


def test_yolox_decay_warms_up_and_follows_the_restored_update_count():
    model = _Tiny().fill(1.0)
    ema = ModelEMA(model, decay=0.9, yolox=True)
    ema.start(model, iteration=0)
    ema.update(model.fill(3.0))
    # update 1: d = 0.9 * (1 - exp(-1/2000)) = 0.00044989; 1 -> 3 - 2d
    assert _values(ema)["linear.weight"] == pytest.approx(2.99910022, abs=1e-6)
    assert _values(ema)["count"] == 3  # integer buffers follow the model

    # Resumed after 1999 updates: update 2000 has d = 0.9 * (1 - 1/e) = 0.56890850.
    resumed = ModelEMA(model.fill(0.0), decay=0.9, yolox=True)
    resumed.load_state_dict(_Tiny().fill(1.0).state_dict())
    resumed.updates.load_state_dict(1999)
    resumed.start(model, iteration=5)  # the stored count wins over the iteration
    assert resumed.num_updates == 1999
    resumed.update(model.fill(3.0))
    assert _values(resumed)["linear.weight"] == pytest.approx(0.5689085 + 0.4310915 * 3, abs=1e-6)


def test_an_ema_state_without_update_count_counts_from_the_iteration():
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9)
    ema.load_state_dict(_Tiny().fill(2.0).state_dict())  # the official files: tensors only
    ema.start(model.fill(7.0), iteration=40)
    assert ema.num_updates == 40 and _values(ema)["linear.weight"] == 2.0


def test_ema_state_of_another_model_is_refused():
    ema = ModelEMA(_Tiny(), decay=0.9)
    state = _Tiny().state_dict()
    state["linear.weight"] = torch.zeros(2, 3)  # transposed
    with pytest.raises(CheckpointError, match=r"my.pth.*1 of other shapes.*linear.weight"):
        ema.load_state_dict(state, "my.pth")


def test_ema_device_follows_model_ema_device(monkeypatch):
    devices, real = [], ema_module.AveragedModel
    # Records the device asked for; the copy itself stays where the model is (no data on "meta").
    monkeypatch.setattr(ema_module, "AveragedModel", lambda m, device, **kw: devices.append(device) or real(m, **kw))
    for device in ("", "cpu"):  # "": the model's
        cfg = tiny_cfg("MODEL_EMA.ENABLED", True, "MODEL_EMA.DEVICE", device)
        add_model_ema(cfg, _Tiny().to("meta"), DiffusionDetCheckpointer(_Tiny()), [])
    assert devices == [torch.device("meta"), torch.device("cpu")]
    monkeypatch.undo()
    if torch.cuda.is_available():  # the use of MODEL_EMA.DEVICE "cpu": the average off the GPU
        model = _Tiny().fill(1.0).cuda()
        ema = ModelEMA(model, 0.5, device="cpu")
        ema.start(model, 0)
        ema.update(model.fill(3.0))
        assert ema.state_dict()["linear.weight"].device.type == "cpu" and _values(ema)["linear.weight"] == 2.0
        with ema.swapped_into(model):
            assert float(model.linear.weight[0, 0]) == 2.0
        assert float(model.linear.weight[0, 0]) == 3.0


class _CheckEMA(HookBase):
    """After each step (registered after the EMA hook): the EMA against ``d(s) * ema + (1 - d(s))
    * weights`` computed here in float64, s counting the steps not skipped."""

    def __init__(self, decay_at):
        self.decay_at, self.errors, self.ema_after = decay_at, [], []

    def before_train(self):
        self.expected = {k: t.detach().double().clone() for k, t in named_tensors(self.trainer.model)}
        self.updates, self.skipped = 0, self.trainer.nonfinite_steps

    def after_step(self):
        if self.trainer.nonfinite_steps == self.skipped:
            self.updates += 1
            d = self.decay_at(self.updates)
            for k, t in named_tensors(self.trainer.model):
                self.expected[k] = d * self.expected[k] + (1 - d) * t.detach().double()
        self.skipped = self.trainer.nonfinite_steps
        ema = self.trainer.model_ema.state_dict()
        self.errors.append(max(float((ema[k].double() - e).abs().max()) for k, e in self.expected.items()))
        self.ema_after.append({k: t.clone() for k, t in ema.items()})


def _cfg(output_dir, *extra):
    cfg = tiny_cfg(
        "DATASETS.TRAIN", ("resume_tiny_train",), "DATASETS.TEST", (), "MODEL.DiffusionDet.NUM_CLASSES", 5,
        "SOLVER.MAX_ITER", 6, "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 11, "OUTPUT_DIR", str(output_dir),
        "MODEL_EMA.ENABLED", True, "MODEL_EMA.DECAY", 0.9, "MODEL_EMA.YOLOX", True, *extra,
    )  # fmt: skip
    cfg.freeze()
    return cfg


def _yolox(s):
    return 0.9 * (1 - math.exp(-s / 2000))


def _train(cfg, resume=False, interrupt_after=None, extra_hooks=(), loss_hook=None):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.register_hooks([*extra_hooks, *([_Interrupt(interrupt_after)] if interrupt_after is not None else [])])
    if loss_hook is not None:
        trainer.loss_hook = loss_hook
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return trainer


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # the untrusted-weights path


def _equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_nonfinite_step_leaves_the_ema_and_final_checkpoint_holds_it(tiny_data, tmp_path):
    check = _CheckEMA(lambda s: 0.5)
    nan_at_2 = lambda it, losses: {k: v * float("nan") if it == 2 else v for k, v in losses.items()}  # noqa: E731
    cfg = _cfg(tmp_path, "SOLVER.MAX_ITER", 4, "MODEL_EMA.DECAY", 0.5, "MODEL_EMA.YOLOX", False)
    trainer = _train(cfg, extra_hooks=[check], loss_hook=nan_at_2)
    assert trainer.nonfinite_steps == 1 and trainer.model_ema.num_updates == 3
    assert max(check.errors) < 1e-6, check.errors
    assert _equal(check.ema_after[1], check.ema_after[2])  # the skipped step
    assert not _equal(check.ema_after[2], check.ema_after[3])
    final = _load(tmp_path / "model_final.pth")
    names = [k for k, _ in trainer.model.named_parameters()] + [k for k, _ in trainer.model.named_buffers()]
    assert list(final["ema_state"]) == names  # the official format: no "module." prefix, buffers too
    assert _equal(final["ema_state"], check.ema_after[-1]) and final["ema_num_updates"] == 3
    assert not _equal(final["ema_state"], {k: final["model"][k] for k in final["ema_state"] if k in final["model"]})


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    """An uninterrupted YOLOX-EMA run (USE_EMA_WEIGHTS_FOR_EVAL_ONLY False) and its final file."""
    out = tmp_path_factory.mktemp("ema_straight")
    check = _CheckEMA(_yolox)
    trainer = _train(_cfg(out), extra_hooks=[check])
    return {"final": _load(out / "model_final.pth"), "check": check,
            "model_after_train": {k: t.clone() for k, t in named_tensors(trainer.model)}}  # fmt: skip


def test_training_averages_every_step_with_yolox_decay(straight):
    assert len(straight["check"].errors) == 6 and max(straight["check"].errors) < 1e-6, straight["check"].errors


def test_use_ema_weights_for_eval_only_false_leaves_the_ema_weights_in_the_model(straight):
    final = straight["final"]
    assert _equal(straight["model_after_train"], final["ema_state"])
    assert not _equal({k: final["ema_state"][k] for k in final["model"]}, final["model"])  # the file keeps raw


def test_resume_restores_model_and_ema_bit_exactly(straight, tmp_path):
    cut = tmp_path / "cut"
    _train(_cfg(cut), interrupt_after=4)  # last checkpoint: after iteration 3 (4 updates)
    checkpoint = _load(cut / "model_0000003.pth")
    assert checkpoint["ema_num_updates"] == 4
    assert not _equal(checkpoint["ema_state"], straight["final"]["ema_state"])
    # The official files have ema_state only: the count then comes from the iteration (no skips here).
    official = tmp_path / "official"
    shutil.copytree(cut, official)
    del checkpoint["ema_num_updates"]
    torch.save(checkpoint, official / "model_0000003.pth")
    for folder in (cut, official):
        resumed = _train(_cfg(folder), resume=True)
        assert resumed.start_iter == 4 and resumed.model_ema.num_updates == 6
        final = _load(folder / "model_final.pth")
        assert _equal(final["model"], straight["final"]["model"]), folder
        assert _equal(final["ema_state"], straight["final"]["ema_state"]), folder


def _record_evaluations(monkeypatch, trainers):
    """Trainer.test replaced by a recorder: the weights it is given, and the EMA at that time."""
    seen = []

    def test(cls, cfg, model, evaluators=None):
        ema = trainers[0].model_ema.state_dict() if trainers else {}
        seen.append(({k: t.clone() for k, t in named_tensors(model)}, {k: t.clone() for k, t in ema.items()}))
        return {}

    monkeypatch.setattr(Trainer, "test", classmethod(test))
    return seen


def test_evaluation_uses_the_ema_weights_then_restores_the_raw_ones(straight, tmp_path, monkeypatch):
    trainers = []
    seen = _record_evaluations(monkeypatch, trainers)
    cfg = _cfg(tmp_path, "DATASETS.TEST", ("resume_tiny_train",), "TEST.EVAL_PERIOD", 2,
               "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY", True)  # fmt: skip
    trainer = Trainer(cfg)
    trainers.append(trainer)
    trainer.resume_or_load(resume=False)
    late = []  # an EvalHook registered after the trainer's (tools/train_net.py's TTA evaluation)
    trainer.register_hooks([EvalHook(0, lambda: late.append({k: t.clone() for k, t in named_tensors(trainer.model)}))])
    trainer.train()
    assert len(seen) == 3  # after iterations 1 and 3, and at the end
    for weights, ema in seen:
        assert _equal(weights, ema)
    assert len(late) == 1 and _equal(late[0], seen[-1][1])
    assert _equal(seen[-1][0], straight["final"]["ema_state"])
    # The raw weights came back bit for bit: the trajectory is the one without evaluations, and
    # with USE_EMA_WEIGHTS_FOR_EVAL_ONLY the model keeps them after training.
    final = _load(tmp_path / "model_final.pth")
    assert _equal(final["model"], straight["final"]["model"])
    assert _equal(trainer.model.state_dict(), final["model"])


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net_for_ema", os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_only_evaluates_the_ema_weights_of_an_official_file(straight, tiny_data, tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "official.pth")  # the official layout: model and ema_state only
    torch.save({"model": straight["final"]["model"], "ema_state": straight["final"]["ema_state"]}, path)
    seen = _record_evaluations(monkeypatch, [])
    train_net = _train_net()
    # Its setup_logger would stop "diffusiondet" records from reaching caplog (and later tests).
    monkeypatch.setattr(train_net, "setup_logger", lambda **kwargs: None)
    main = train_net.main
    common = ["--config-file", CONFIG, "--eval-only", *TINY_OPTS, "MODEL.WEIGHTS", path,
              "MODEL.DiffusionDet.NUM_CLASSES", 5, "OUTPUT_DIR", tmp_path / "eval"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffusiondet"):
        main(argument_parser().parse_args([*map(str, common), "MODEL_EMA.ENABLED", "True"]))
        main(argument_parser().parse_args([*map(str, common), "MODEL_EMA.ENABLED", "False"]))
    assert f"Loaded the EMA weights (ema_state) of {path}" in caplog.text
    assert f"Loaded the raw weights (model) of {path}" in caplog.text
    ema_seen, raw_seen = seen[0][0], seen[1][0]
    assert _equal(ema_seen, straight["final"]["ema_state"])
    assert _equal({k: raw_seen[k] for k in straight["final"]["model"]}, straight["final"]["model"])


def test_ema_evaluation_of_a_file_without_ema_state_names_the_file(straight, tmp_path):
    path = str(tmp_path / "raw.pth")
    torch.save({"model": straight["final"]["model"]}, path)
    cfg = _cfg(tmp_path)
    model = Trainer.build_model(cfg)
    with pytest.raises(CheckpointError, match=f"{path} has no ema_state.*MODEL_EMA.ENABLED False"):
        load_model_weights(model, cfg, path)
    load_model_weights(model, cfg, path, ema=False)  # the raw weights, asked for explicitly
    assert _equal({k: model.state_dict()[k] for k in straight["final"]["model"]}, straight["final"]["model"])
