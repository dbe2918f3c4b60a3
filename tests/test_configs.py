"""Every paper-size YAML in configs/ builds its full-size model; invalid values fail at start-up
with a clear message. (The ablations differ from their base by a few keys only; every YAML,
ablations included, trains and runs at tiny sizes in test_every_config_runs.py.)"""
import glob
import os

import pytest
import torch

from detectron2.modeling import build_model

from diffusionengine import build_config

from .conftest import diffusionengine_opts

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
# Every YAML directly under configs/, by name: a file added or removed there fails
# test_configs_found until it is listed here, so each one is built below.
CONFIG_NAMES = (
    "Base-DiffusionDet.yaml",
    "Base-DiffusionEngine.yaml",
    "Base-DiffusionInst.yaml",
    "diffdet.coco.res101.yaml",
    "diffdet.coco.res50.300boxes.yaml",
    "diffdet.coco.res50.yaml",
    "diffdet.coco.swinbase.yaml",
    "diffdet.coco_to_crowdhuman.res50.yaml",
    "diffdet.crowdhuman.res50.yaml",
    "diffdet.effnet_lite0.pretrained.cpu.yaml",
    "diffdet.effnet_lite0.scratch.cpu.yaml",
    "diffdet.lvis.res101.yaml",
    "diffdet.lvis.res50.yaml",
    "diffdet.lvis.swinbase.yaml",
    "diffdet.synthetic.res18.yaml",
    "diffengine.coco.sd2.yaml",
    "diffengine.synthetic.tinysd.yaml",
    "diffinst.coco.res101.yaml",
    "diffinst.coco.res50.inst.yaml",
    "diffinst.coco.res50.yaml",
    "diffinst.coco.swinbase.yaml",
    "diffinst.lvis.res101.yaml",
    "diffinst.lvis.res50.yaml",
    "diffinst.lvis.swinbase.yaml",
    "diffinst.synthetic.res18.yaml",
    "diffinst.tiny_coco.res18.yaml",
)
CONFIGS = [os.path.join(CONFIG_DIR, name) for name in CONFIG_NAMES]


def test_configs_found():
    on_disk = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
    assert sorted(CONFIG_NAMES) == on_disk
    # ... and the build test below is parametrised with exactly these files.
    (params,) = [m for m in test_every_config_builds.pytestmark if m.name == "parametrize"]
    assert sorted(os.path.basename(p) for p in params.args[1]) == on_disk


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_every_config_builds(path, tiny_sd_folder):
    cfg = build_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *diffusionengine_opts(path, tiny_sd_folder)])
    torch.manual_seed(0)
    model = build_model(cfg)
    keys = model.state_dict().keys()
    assert any(k.startswith("head.head_series.") for k in keys)
    assert "alphas_cumprod" in keys
    assert len(model.head.head_series) == cfg.MODEL.DiffusionDet.NUM_HEADS
    is_inst = os.path.basename(path).startswith(("diffinst", "Base-DiffusionInst"))
    assert (cfg.MODEL.META_ARCHITECTURE == "DiffusionInst") == is_inst
    assert ("head.head_series.0.controller.weight" in keys) == is_inst
    assert ("head.mask_head.0.0.weight" in keys) == is_inst


def test_official_diffusioninst_head_size():
    # Measured by instantiating the official DiffusionInst head: COCO, 80 classes.
    cfg = build_config(
        os.path.join(CONFIG_DIR, "diffinst.coco.res50.yaml"), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    )
    head = build_model(cfg).head
    assert len(head.state_dict()) == 312
    assert sum(p.numel() for p in head.parameters()) == 85_587_350
    assert tuple(head.head_series[0].controller.weight.shape) == (153, 256)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.DiffusionDet.SAMPLE_STEP", 0], "SAMPLE_STEP"),
        (["MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", -3], "EVAL_NUM_PROPOSALS"),
        (["MODEL.DiffusionDet.NUM_PROPOSALS", 0], "NUM_PROPOSALS"),
        (["MODEL.DiffusionDet.PADDING", "zeros"], "PADDING"),
        (["MODEL.DiffusionDet.ENSEMBLE", "last"], "ENSEMBLE"),
        (["MODEL.DiffusionDet.HIDDEN_DIM", 128], "HIDDEN_DIM"),
        (["DATASETS.CUSTOM.TRAIN_JSON", "a.json"], "TRAIN_IMAGES must be set together, got 'a.json' and ''"),
        (["MODEL.DiffusionDet.RENEWAL_THRESHOLD", 1.5], "MODEL.DiffusionDet.RENEWAL_THRESHOLD .* got 1.5"),
        (["SOLVER.MAX_NONFINITE_STEPS", -1], "SOLVER.MAX_NONFINITE_STEPS must be >= 0, got -1"),
        # Out of range these fail deep inside torch (a zero prior divides by zero) or build
        # another model than the one asked for.
        (["MODEL.DiffusionDet.NHEADS", 0], r"MODEL.DiffusionDet.NHEADS must be >= 1 and divide HIDDEN_DIM \(64\), got 0"),
        (["MODEL.DiffusionDet.NHEADS", 3], r"MODEL.DiffusionDet.NHEADS must be >= 1 and divide HIDDEN_DIM \(64\), got 3"),
        (["MODEL.DiffusionDet.DROPOUT", 1.0], r"MODEL.DiffusionDet.DROPOUT must be in \[0, 1\), got 1.0"),
        (["MODEL.DiffusionDet.DROPOUT", -0.1], r"MODEL.DiffusionDet.DROPOUT must be in \[0, 1\), got -0.1"),
        (["MODEL.DiffusionDet.DIM_FEEDFORWARD", 0], r"MODEL.DiffusionDet.DIM_FEEDFORWARD must be >= 1, .* got 0"),
        (["MODEL.DiffusionDet.ACTIVATION", "glu", "MODEL.DiffusionDet.DIM_FEEDFORWARD", 63], "MODEL.DiffusionDet.DIM_FEEDFORWARD .* got 63 with ACTIVATION 'glu'"),
        (["MODEL.DiffusionDet.NUM_CLS", -1], r"MODEL.DiffusionDet.NUM_CLS must be >= 0, got -1"),
        (["MODEL.DiffusionDet.NUM_REG", -1], r"MODEL.DiffusionDet.NUM_REG must be >= 0, got -1"),
        (["MODEL.DiffusionDet.NUM_HEADS", 0], r"MODEL.DiffusionDet.NUM_HEADS must be >= 1, got 0"),
        (["MODEL.DiffusionDet.DIM_DYNAMIC", 0], r"MODEL.DiffusionDet.DIM_DYNAMIC must be >= 1, got 0"),
        (["MODEL.DiffusionDet.DYNAMIC_CHUNK_SIZE", -1], r"MODEL.DiffusionDet.DYNAMIC_CHUNK_SIZE must be >= 0 \(0 = automatic\), got -1"),
        (["MODEL.DiffusionDet.BBOX_SCALE_CLAMP", 0.0], r"MODEL.DiffusionDet.BBOX_SCALE_CLAMP must be > 0, got 0.0"),
        (["MODEL.DiffusionDet.CLASS_WEIGHT", -2.0], r"MODEL.DiffusionDet.CLASS_WEIGHT must be >= 0, got -2.0"),
        (["MODEL.DiffusionDet.GIOU_WEIGHT", -2.0], r"MODEL.DiffusionDet.GIOU_WEIGHT must be >= 0, got -2.0"),
        (["MODEL.DiffusionDet.L1_WEIGHT", -5.0], r"MODEL.DiffusionDet.L1_WEIGHT must be >= 0, got -5.0"),
        (["MODEL.DiffusionDet.NO_OBJECT_WEIGHT", -0.1], r"MODEL.DiffusionDet.NO_OBJECT_WEIGHT must be >= 0, got -0.1"),
        (["MODEL.DiffusionDet.ALPHA", 1.5], r"MODEL.DiffusionDet.ALPHA must be in \[0, 1\], got 1.5"),
        (["MODEL.DiffusionDet.ALPHA", -0.25], r"MODEL.DiffusionDet.ALPHA must be in \[0, 1\], got -0.25"),
        (["MODEL.DiffusionDet.GAMMA", -2.0], r"MODEL.DiffusionDet.GAMMA must be >= 0, got -2.0"),
        (["MODEL.DiffusionDet.PRIOR_PROB", 0.0], r"MODEL.DiffusionDet.PRIOR_PROB must be in \(0, 1\), got 0.0"),
        (["MODEL.DiffusionDet.PRIOR_PROB", 1.0], r"MODEL.DiffusionDet.PRIOR_PROB must be in \(0, 1\), got 1.0"),
        (["MODEL.DiffusionDet.FED_LOSS_NUM_CLASSES", 0], r"MODEL.DiffusionDet.FED_LOSS_NUM_CLASSES must be >= 1, got 0"),
        (["MODEL.DiffusionDet.CENTER_RADIUS", -1.0], r"MODEL.DiffusionDet.CENTER_RADIUS must be >= 0, got -1.0"),
        (["MODEL.DiffusionDet.NOT_IN_BOTH_COST", -100.0], r"MODEL.DiffusionDet.NOT_IN_BOTH_COST must be >= 0, got -100.0"),
        (["MODEL.DiffusionDet.NOT_FG_COST", -1.0], r"MODEL.DiffusionDet.NOT_FG_COST must be >= 0, got -1.0"),
        (["MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", -1], r"MODEL.DiffusionDet.DETECTIONS_PER_IMAGE must be >= 0 \(0 keeps all\), got -1"),
        (["SOLVER.BACKBONE_MULTIPLIER", -1.0], r"SOLVER.BACKBONE_MULTIPLIER must be >= 0, got -1.0"),
        (["INPUT.CROP.PRE_CROP_MIN_SIZES", (400, 0)], r"INPUT.CROP.PRE_CROP_MIN_SIZES must be one or more sizes >= 1, got \(400, 0\)"),
        (["INPUT.CROP.PRE_CROP_MIN_SIZES", ()], r"INPUT.CROP.PRE_CROP_MIN_SIZES must be one or more sizes >= 1, got \(\)"),
        (["MODEL_EMA.DECAY", 1.0], r"MODEL_EMA.DECAY must be in \[0, 1\), got 1.0"),
        (["MODEL_EMA.DEVICE", "gpu0"], r"MODEL_EMA.DEVICE must be '', 'cpu' or a cuda device, got 'gpu0'"),
        (["SOLVER.ACCUMULATE_STEPS", 0], r"SOLVER.ACCUMULATE_STEPS must be >= 1, got 0"),
        (["SOLVER.CHECKPOINT_MAX_KEEP", -1], r"SOLVER.CHECKPOINT_MAX_KEEP must be >= 0 \(0 keeps all\), got -1"),
        (["TEST.AUG.MERGE", "vote"], r"TEST.AUG.MERGE must be one of \('soft_vote', 'nms', 'wbf'\), got 'vote'"),
        # The synthetic config inherits the official 13 sizes with 13 ranges.
        (["TEST.AUG.MIN_SIZES", (160, 200)], r"TEST.AUG.SCALE_RANGES has 13 \(low, high\) pairs but TEST.AUG.MIN_SIZES has 2"),
        (["TEST.AUG.MIN_SIZES", (160,), "TEST.AUG.SCALE_RANGES", [[50, 10]]], r"TEST.AUG.SCALE_RANGES\[0\] must be \(low, high\) with 0 <= low < high, got \[50, 10\]"),
    ],
)
def test_invalid_values_fail_clearly(opts, message):
    with pytest.raises(ValueError, match=message):
        build_config(os.path.join(CONFIG_DIR, "diffdet.synthetic.res18.yaml"), opts)


def test_steps_and_boxes_shorthands():
    cfg = build_config(os.path.join(CONFIG_DIR, "diffdet.synthetic.res18.yaml"), [], steps=4, boxes=321)
    assert cfg.MODEL.DiffusionDet.SAMPLE_STEP == 4
    assert cfg.MODEL.DiffusionDet.EVAL_NUM_PROPOSALS == 321
    with pytest.raises(ValueError, match="SAMPLE_STEP"):
        build_config(os.path.join(CONFIG_DIR, "diffdet.synthetic.res18.yaml"), [], steps=0)
    with pytest.raises(ValueError, match="EVAL_NUM_PROPOSALS"):
        build_config(os.path.join(CONFIG_DIR, "diffdet.synthetic.res18.yaml"), [], boxes=0)


def test_unknown_or_unpaired_override_keys_fail_clearly():
    config = os.path.join(CONFIG_DIR, "diffdet.synthetic.res18.yaml")
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.DiffusionDet.NUM_CLASS"):
        build_config(config, ["MODEL.DiffusionDet.NUM_CLASS", 3])
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.DiffusionDet.NUM_CLASSES.X"):
        build_config(config, ["MODEL.DiffusionDet.NUM_CLASSES.X", 3])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        build_config(config, ["MODEL.DiffusionDet.NUM_CLASSES"])
