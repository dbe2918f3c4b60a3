"""Fault-drill cases: config_weights (bad config values and keys, bad MODEL.WEIGHTS files).

Every key checked by ``validate_diffusiondet_config`` gets one case from ``BAD_VALUES``; a key that
the validation reads but the table lacks shows up as a SILENT case, so the table cannot fall
behind the validation.
"""
import functools
import inspect
import os
import re

from .common import Case, Silent, capture_logs, check, expect_error, expect_logged
from .training import CONFIG, train_net

# (key, bad value, other opts needed to provoke that check)
BAD_VALUES = [
    ("MODEL.DiffusionDet.NUM_CLASSES", 0, ()),
    ("MODEL.DiffusionDet.NUM_PROPOSALS", 0, ()),
    ("MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", -3, ()),
    ("MODEL.DiffusionDet.SAMPLE_STEP", 0, ()),
    ("MODEL.DiffusionDet.NUM_TIMESTEPS", 1, ()),
    ("MODEL.DiffusionDet.PADDING", "zeros", ()),
    ("MODEL.DiffusionDet.ENSEMBLE", "last", ()),
    ("MODEL.DiffusionDet.SAMPLER_UPDATE", "euler", ()),
    ("MODEL.DiffusionDet.SNR_SCALE", 0.0, ()),
    ("MODEL.DiffusionDet.PLACEHOLDER_STD", -0.1, ()),
    ("MODEL.DiffusionDet.RENEWAL_THRESHOLD", 1.5, ()),
    ("MODEL.DiffusionDet.NMS_THRESH", 0.0, ()),
    ("MODEL.DiffusionDet.DDIM_ETA", -1.0, ()),
    ("MODEL.DiffusionDet.NUM_DYNAMIC", 3, ()),
    ("MODEL.DiffusionDet.OTA_K", 0, ()),
    ("MODEL.DiffusionDet.HIDDEN_DIM", 128, ()),
    ("MODEL.DiffusionDet.INFERENCE_AMP", "int8", ()),
    ("MODEL.DiffusionDet.POOLER_THREADS", -1, ()),
    ("MODEL.DiffusionDet.DYNAMIC_MEMORY_BUDGET_MB", -1, ()),
    ("MODEL.DiffusionDet.SAMPLING_MODE", "fast", ()),
    ("MODEL.DiffusionDet.COMPILE_SAMPLING_STEP", True, ("MODEL.DiffusionDet.SAMPLING_MODE", "parity")),
    ("MODEL.FPN.OUT_CHANNELS", 32, ()),
    ("MODEL.SWIN.SIZE", "XL", ()),
    ("MODEL.SWIN.OUT_FEATURES", (1, 4), ()),
    ("MODEL.TIMM.NORM", "GN", ()),
    ("MODEL.TIMM.DROP_PATH_RATE", -0.1, ()),
    ("MODEL.BACKBONE.NAME", "build_timm_fpn_backbone", ()),
    ("MODEL.TIMM.NAME", "", ("MODEL.BACKBONE.NAME", "build_timm_fpn_backbone")),
    ("TEST.IMS_PER_BATCH", 0, ()),
    ("SOLVER.OPTIMIZER", "LAMB", ()),
    ("SOLVER.MAX_NONFINITE_STEPS", -1, ()),
    ("DATASETS.CUSTOM.TRAIN_JSON", "train.json", ()),
    ("DATASETS.CUSTOM.TRAIN_IMAGES", "train_images", ()),
    ("DATASETS.CUSTOM.TEST_JSON", "test.json", ()),
    ("DATASETS.CUSTOM.TEST_IMAGES", "test_images", ()),
    ("MODEL.DiffusionDet.NHEADS", 3, ()),
    ("MODEL.DiffusionDet.DROPOUT", 1.0, ()),
    ("MODEL.DiffusionDet.DIM_FEEDFORWARD", 0, ()),
    ("MODEL.DiffusionDet.ACTIVATION", "glu", ("MODEL.DiffusionDet.DIM_FEEDFORWARD", 63)),
    ("MODEL.DiffusionDet.NUM_CLS", -1, ()),
    ("MODEL.DiffusionDet.NUM_REG", -1, ()),
    ("MODEL.DiffusionDet.NUM_HEADS", 0, ()),
    ("MODEL.DiffusionDet.DIM_DYNAMIC", 0, ()),
    ("MODEL.DiffusionDet.DYNAMIC_CHUNK_SIZE", -1, ()),
    ("MODEL.DiffusionDet.BBOX_SCALE_CLAMP", 0.0, ()),
    ("MODEL.DiffusionDet.CLASS_WEIGHT", -2.0, ()),
    ("MODEL.DiffusionDet.GIOU_WEIGHT", -2.0, ()),
    ("MODEL.DiffusionDet.L1_WEIGHT", -5.0, ()),
    ("MODEL.DiffusionDet.NO_OBJECT_WEIGHT", -0.1, ()),
    ("MODEL.DiffusionDet.ALPHA", 1.5, ()),
    ("MODEL.DiffusionDet.GAMMA", -2.0, ()),
    ("MODEL.DiffusionDet.PRIOR_PROB", 0.0, ()),
    ("MODEL.DiffusionDet.FED_LOSS_NUM_CLASSES", 0, ()),
    ("MODEL.DiffusionDet.CENTER_RADIUS", -1.0, ()),
    ("MODEL.DiffusionDet.NOT_IN_BOTH_COST", -100.0, ()),
    ("MODEL.DiffusionDet.NOT_FG_COST", -1.0, ()),
    ("MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", -1, ()),
    ("SOLVER.BACKBONE_MULTIPLIER", -1.0, ()),
    ("INPUT.CROP.PRE_CROP_MIN_SIZES", (400, 0), ()),
    ("MODEL.TRUST_WEIGHTS", "maybe", ()),
    ("MODEL.DiffusionDet.MAX_INFERENCE_MEMORY_MB", -1, ()),
    ("INPUT.CROP.PRE_CROP_MAX_SIZE", 0, ()),
]
# A second check on a key already in the table: SAMPLE_STEP may not exceed NUM_TIMESTEPS.
EXTRA_BAD_VALUES = [("MODEL.DiffusionDet.SAMPLE_STEP", 50, ("MODEL.DiffusionDet.NUM_TIMESTEPS", 20))]


def _build(opts):
    from diffusiondet.engine import build_config

    return build_config(CONFIG, list(opts))


def _bad_value(key, value, extra, workdir):
    return expect_error(lambda: _build([key, value, *extra]), names=[key, str(value)], exc=(ValueError,))


def _validated_keys():
    """The full config keys ``validate_diffusiondet_config`` and the backbone checks read
    (``d.X`` is MODEL.DiffusionDet.X)."""
    from diffusiondet.backbone_config import backbone_config_errors
    from diffusiondet.config import validate_diffusiondet_config

    source = inspect.getsource(validate_diffusiondet_config) + inspect.getsource(backbone_config_errors)
    # Key names may hold digits after their first letter (L1_WEIGHT).
    keys = {"MODEL.DiffusionDet." + k for k in re.findall(r"\bd\.([A-Z_][A-Z0-9_]*)", source)}
    keys |= {k for k in re.findall(r"\bcfg\.((?:[A-Z_][A-Z0-9_]*\.)*[A-Z_][A-Z0-9_]*)\b", source) if "." in k}
    return keys


def _uncovered(workdir):
    missing = sorted(_validated_keys() - {key for key, _, _ in BAD_VALUES})
    if missing:
        raise Silent(f"validated keys without a bad-value case in BAD_VALUES: {missing}")
    return f"all {len(BAD_VALUES)} validated keys have a case"


def _type_mismatch(workdir):
    return expect_error(lambda: _build(["MODEL.DiffusionDet.NUM_CLASSES", "many"]),
                        names=["MODEL.DiffusionDet.NUM_CLASSES", "many"], exc=(ValueError,))


def _unknown_key_opts(workdir):
    return expect_error(lambda: _build(["MODEL.DiffusionDet.NUM_CLASS", 3]),
                        names=["MODEL.DiffusionDet.NUM_CLASS"], exc=(KeyError,))


def _unknown_key_yaml(workdir):
    from diffusiondet.engine import build_config

    path = os.path.join(workdir, "typo.yaml")
    with open(path, "w") as f:
        f.write(f'_BASE_: "{CONFIG}"\nMODEL:\n  DiffusionDet:\n    NUM_PROPOSAL: 100\n')
    return expect_error(lambda: build_config(path), names=["MODEL.DiffusionDet.NUM_PROPOSAL"], exc=(KeyError,))


def _unknown_key_cli(workdir):
    proc = train_net(workdir, "--eval-only", "MODEL.DEVICE", "cpu", "MODEL.DiffusionDet.NUM_CLASS", 3)
    check(proc.returncode != 0, "train_net.py accepted an unknown key")
    last = proc.stderr.strip().splitlines()[-1]
    check("MODEL.DiffusionDet.NUM_CLASS" in last, f"the error does not name the key: {last}")
    return f"train_net.py exits {proc.returncode}: {last}"


# --- MODEL.WEIGHTS -----------------------------------------------------------------------------------


def _tiny_model(*opts):
    import torch
    from detectron2.modeling import build_model

    from tests.utils import tiny_cfg

    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


def _load(model, path):
    from diffusiondet.engine import DiffusionDetCheckpointer

    return DiffusionDetCheckpointer(model).resume_or_load(path, resume=False)


def _save(workdir, name, state):
    import torch

    path = os.path.join(workdir, name)
    torch.save(state, path)
    return path


def _weights_missing(workdir):
    path = os.path.join(workdir, "no_such_model.pth")
    return expect_error(lambda: _load(_tiny_model(), path), names=[path], exc=(FileNotFoundError,))


def _weights_missing_cli(workdir):
    path = os.path.join(workdir, "no_such_model.pth")
    proc = train_net(workdir, "--eval-only", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", path,
                     "DATASETS.TEST", "()", "OUTPUT_DIR", os.path.join(workdir, "out"))
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    check(proc.returncode != 0 and path in last, f"rc {proc.returncode}, last line: {last}")
    return f"train_net.py --eval-only exits {proc.returncode}: {last}"


def _weights_truncated(workdir):
    path = _save(workdir, "model_final.pth", {"model": _tiny_model().state_dict()})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return expect_error(lambda: _load(_tiny_model(), path), names=[path, "truncated"])


def _weights_other_hidden_dim(workdir):
    path = _save(workdir, "hidden32.pth", {"model": _tiny_model().state_dict()})
    wider = _tiny_model("MODEL.DiffusionDet.HIDDEN_DIM", 64, "MODEL.FPN.OUT_CHANNELS", 64)
    return expect_error(lambda: _load(wider, path),
                        names=[path, "another architecture", "(32, 64, 1, 1) vs (64, 64, 1, 1)"])


def _weights_torchvision_classifier(workdir):
    import torchvision

    path = _save(workdir, "resnet18.pth", torchvision.models.resnet18(weights=None).state_dict())
    return expect_error(lambda: _load(_tiny_model(), path),
                        names=[path, "fits none", "conv1.weight (64, 3, 7, 7)"])


def _weights_other_num_classes(workdir):
    import torch

    source = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 3)
    path = _save(workdir, "three_classes.pth", {"model": source.state_dict()})
    target = _tiny_model("MODEL.DiffusionDet.NUM_CLASSES", 7)
    with capture_logs("diffusiondet") as logs:
        _load(target, path)
    line = expect_logged(logs, ["class layers re-initialised", "class_logits.weight (3, 32) vs (7, 32)"])
    loaded = target.state_dict()
    lost = [k for k, v in source.state_dict().items() if "class_logits" not in k and not torch.equal(loaded[k], v)]
    check(not lost, f"weights not loaded besides the class layers: {lost[:5]}")
    return "fine-tuning allowed, everything else loaded; " + line


# --- code in weights and configs, NaN weights, inference without weights (issue #21) -------------


class _Payload:
    """Unpickles as ``os.mkdir(path)``: the case checks the folder was not created."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _not_run(marker):
    check(not os.path.exists(marker), f"the payload ran: {marker} exists")


def _weights_pkl_payload(workdir):
    import pickle

    marker = os.path.join(workdir, "payload_ran")
    state = {k: v.detach().numpy() for k, v in _tiny_model().state_dict().items()}
    path = os.path.join(workdir, "model_zoo.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "zoo", "extra": _Payload(marker)}, f)
    line = expect_error(lambda: _load(_tiny_model(), path), names=[path, "contains code", "posix.mkdir"])
    _not_run(marker)
    return line


def _weights_pth_payload(workdir):
    marker = os.path.join(workdir, "payload_ran")
    path = _save(workdir, "model_final.pth", {"model": _tiny_model().state_dict(), "x": _Payload(marker)})
    line = expect_error(lambda: _load(_tiny_model(), path),
                        names=[path, "not a plain checkpoint (contains code)", "posix.mkdir"])
    check("truncated" not in line, f"a payload reported as a corrupt file: {line}")
    _not_run(marker)
    return line


def _config_yaml_payload(workdir):
    from unittest import mock

    from diffusiondet.engine import build_config

    marker = os.path.join(workdir, "payload_ran")
    path = os.path.join(workdir, "evil.yaml")
    with open(path, "w") as f:
        f.write(f'_BASE_: "{CONFIG}"\nSEED: !!python/object/apply:os.mkdir ["{marker}"]\n')
    with mock.patch.dict(os.environ, {"DIFFUSIONDET_TRUST_CONFIG": ""}):
        line = expect_error(lambda: build_config(path), names=[path, "run code"], exc=(ValueError,))
    _not_run(marker)
    return line


def _weights_bytes_overwritten(workdir):
    import torch

    # 64 bytes of 0xFF inside the largest tensor's storage: 16 float32 NaNs, a valid zip file.
    state = _tiny_model().state_dict()
    largest = max(state, key=lambda k: state[k].numel())
    path = _save(workdir, "model_final.pth", {"model": state})
    data = bytearray(open(path, "rb").read())
    needle = state[largest].numpy().tobytes()[:64]
    at = data.find(needle)
    check(at >= 0, "tensor bytes not found in the file")
    data[at:at + 64] = b"\xff" * 64
    open(path, "wb").write(bytes(data))
    check(not torch.isfinite(torch.load(path)["model"][largest]).all(), "the overwrite left the weights finite")
    return expect_error(lambda: _load(_tiny_model(), path), names=[path, "16 non-finite", largest])


def _eval_only_without_weights_cli(workdir):
    proc = train_net(workdir, "--eval-only", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                     "DATASETS.TEST", "()", "OUTPUT_DIR", os.path.join(workdir, "out"))
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    check(proc.returncode != 0 and "MODEL.WEIGHTS is empty" in last, f"rc {proc.returncode}, last line: {last}")
    return f"train_net.py --eval-only exits {proc.returncode}: {last}"


def _demo_other_architecture(workdir):
    from diffusiondet.tooling.demo import Demo
    from tests.utils import tiny_cfg

    path = _save(workdir, "hidden32.pth", {"model": _tiny_model().state_dict()})
    cfg = tiny_cfg("MODEL.DiffusionDet.HIDDEN_DIM", 64, "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.WEIGHTS", path)
    return expect_error(lambda: Demo(cfg, 0.5), names=[path, "another architecture"])


def _run_main_job_without_weights(workdir):
    import importlib.util

    from .training import REPO

    spec = importlib.util.spec_from_file_location("run_main_job", os.path.join(REPO, "tools", "run_main_job.py"))
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    missing = os.path.join(workdir, "output", "model_final.pth")
    cfg = job.build_config(CONFIG, ["MODEL.DEVICE", "cpu", "DATASETS.TEST", "()"], steps=1, boxes=10)
    return expect_error(lambda: job.evaluate(cfg, missing), names=[missing])


def _boxes_beyond_memory_budget(workdir):
    # 200000 boxes: one stage's attention alone is ~1.2 TiB (8 heads); the default budget refuses it.
    opts = ["MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 200000, "TEST.IMS_PER_BATCH", 1]
    return expect_error(lambda: _build(opts), names=["--boxes", "200000", "MiB", "MAX_INFERENCE_MEMORY_MB"],
                        exc=(ValueError,))


def _cases():
    cases = [
        Case("config_weights", f"bad_value[{key}]", functools.partial(_bad_value, key, value, extra))
        for key, value, extra in BAD_VALUES
    ]
    cases += [
        Case("config_weights", f"bad_value[{key}>NUM_TIMESTEPS]", functools.partial(_bad_value, key, value, extra))
        for key, value, extra in EXTRA_BAD_VALUES
    ]
    return cases + [
        Case("config_weights", "every_validated_key_has_a_case", _uncovered),
        Case("config_weights", "type_mismatch", _type_mismatch),
        Case("config_weights", "unknown_key_opts", _unknown_key_opts),
        Case("config_weights", "unknown_key_yaml", _unknown_key_yaml),
        Case("config_weights", "unknown_key_train_net_cli", _unknown_key_cli, slow=True),
        Case("config_weights", "weights_missing_file", _weights_missing),
        Case("config_weights", "weights_missing_file_cli", _weights_missing_cli, slow=True),
        Case("config_weights", "weights_truncated_file", _weights_truncated),
        Case("config_weights", "weights_other_hidden_dim", _weights_other_hidden_dim),
        Case("config_weights", "weights_torchvision_classifier", _weights_torchvision_classifier),
        Case("config_weights", "weights_other_num_classes", _weights_other_num_classes),
        Case("config_weights", "weights_pkl_pickle_payload", _weights_pkl_payload),
        Case("config_weights", "weights_pth_pickle_payload", _weights_pth_payload),
        Case("config_weights", "config_yaml_python_tag", _config_yaml_payload),
        Case("config_weights", "weights_64_bytes_overwritten", _weights_bytes_overwritten),
        Case("config_weights", "eval_only_without_weights_cli", _eval_only_without_weights_cli, slow=True),
        Case("config_weights", "demo_weights_of_another_architecture", _demo_other_architecture),
        Case("config_weights", "run_main_job_weights_missing", _run_main_job_without_weights),
        Case("config_weights", "boxes_beyond_memory_budget", _boxes_beyond_memory_budget),
    ]


CASES = _cases()
