"""Every YAML under configs/ (recursively) trains one step and runs one inference call on CPU.

Each config keeps its architecture family (meta-architecture, backbone builder and depth, number
of head stages up to 12, classes, losses, padding, sampling keys); only widths, box counts and
input sizes shrink, so a mistake that only shows when a config's keys meet the model code (a
missing registration, a key of the wrong type, an FPN feature name that does not exist) fails
here instead of hours into a cluster job. Images are non-square with non-square GT boxes.
"""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks

from diffusionengine import build_config

from .conftest import diffusionengine_opts
from .utils import random_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
SWIN_BACKBONE = "build_swintransformer_fpn_backbone"
MAX_STAGES = 12  # the deepest head any paper config uses (Table 6); bounds the CPU time

TINY = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.DiffusionDet.HIDDEN_DIM", 32,
    "MODEL.DiffusionDet.DIM_FEEDFORWARD", 64,
    "MODEL.DiffusionDet.NHEADS", 4,
    "MODEL.DiffusionDet.DIM_DYNAMIC", 8,
    "MODEL.DiffusionDet.NUM_PROPOSALS", 10,
    # CrowdHuman configs evaluate with 500-1000 boxes; 0 = NUM_PROPOSALS keeps the call small.
    "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 0,
    "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 32,  # GN (the CPU configs) needs 32 groups
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96,
    "DATALOADER.NUM_WORKERS", 0,
]  # fmt: skip


def _rel(path):
    return os.path.relpath(path, ROOT)


def tiny_config(path, sd_path=""):
    """The config at ``path`` with the TINY sizes (and Swin-T for Swin configs, the tiny random
    SD folder ``sd_path`` for DiffusionEngine configs)."""
    engine = diffusionengine_opts(path, sd_path)
    full = build_config(path, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *engine])
    stages = min(full.MODEL.DiffusionDet.NUM_HEADS, MAX_STAGES)
    opts = TINY + engine + ["MODEL.DiffusionDet.NUM_HEADS", stages]
    if full.MODEL.BACKBONE.NAME == SWIN_BACKBONE:
        opts += ["MODEL.SWIN.SIZE", "T"]  # same code path as B/L, a third of the blocks
    return full, build_config(path, opts)


def with_box_masks(inp):
    """DiffusionInst inputs: each GT gets a bitmask filling its (rounded) box."""
    inst = inp["instances"]
    height, width = inst.image_size
    masks = torch.zeros(len(inst), height, width, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(inst.gt_boxes.tensor.round().long().tolist()):
        masks[i, y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = True
    inst.gt_masks = BitMasks(masks)
    return inp


def test_configs_found_recursively():
    names = {_rel(p) for p in CONFIGS}
    assert "configs/Base-DiffusionDet.yaml" in names
    assert any(n.startswith("configs/ablations/") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_config_trains_one_step_and_infers(path, monkeypatch, tiny_sd_folder):
    full, cfg = tiny_config(path, tiny_sd_folder)
    d = cfg.MODEL.DiffusionDet
    # The overrides change sizes only, never the family the config describes.
    for key in ("META_ARCHITECTURE", "BACKBONE.NAME", "RESNETS.DEPTH", "TIMM.NAME"):
        node_full, node_tiny = full.MODEL, cfg.MODEL
        for part in key.split("."):
            node_full, node_tiny = node_full[part], node_tiny[part]
        assert node_full == node_tiny, key
    is_inst = cfg.MODEL.META_ARCHITECTURE == "DiffusionInst"
    num_classes = d.NUM_CLASSES

    torch.manual_seed(0)
    model = build_model(cfg)
    stages = min(full.MODEL.DiffusionDet.NUM_HEADS, MAX_STAGES)
    assert len(model.head.head_series) == d.NUM_HEADS == stages
    if d.USE_FED_LOSS:
        # LVIS: sampling weights from the registered training set's class_image_count, not the
        # uniform fallback that _fed_loss_weights uses when metadata is missing.
        weights = model.criterion.fed_loss_cls_weights
        assert weights.shape == (num_classes,) and weights.min() < weights.max()

    # One training step on 2 non-square images with GT.
    k = min(num_classes, 3)
    batch = [random_input(64, 80, 3, k, seed=1), random_input(48, 96, 2, k, seed=2)]
    if is_inst:
        batch = [with_box_masks(inp) for inp in batch]
    model.train()
    losses = model(batch)
    total = sum(losses.values())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total.backward()
    head_grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert any(g.abs().sum() > 0 for g in head_grads)
    assert all(torch.isfinite(g).all() for g in head_grads)

    # One inference call; the second image reports a larger original size (outputs are rescaled).
    # An untrained head may predict degenerate boxes that detector_postprocess drops, so the
    # sampler's raw detections are recorded (not changed) to show the call produced boxes.
    raw_counts = []

    def recording_select(candidates, select=model.sampler.select_detections):
        det = select(candidates)
        assert torch.isfinite(det["boxes"]).all() and torch.isfinite(det["scores"]).all()
        raw_counts.append(len(det["scores"]))
        return det

    monkeypatch.setattr(model.sampler, "select_detections", recording_select)
    test_inputs = [random_input(64, 96, 0, k, seed=3), random_input(80, 64, 0, k, seed=4)]
    test_inputs[1].update(height=120, width=96)
    model.eval()
    with torch.no_grad():
        outputs = model(test_inputs)
    assert len(outputs) == 2 and len(raw_counts) == 2 and min(raw_counts) > 0
    for inp, out, raw_count in zip(test_inputs, outputs, raw_counts):
        inst = out["instances"]
        assert inst.image_size == (inp["height"], inp["width"]) and len(inst) <= raw_count
        boxes = inst.pred_boxes.tensor
        assert torch.isfinite(boxes).all() and (boxes >= 0).all()
        assert (boxes[:, 0::2] <= inp["width"]).all() and (boxes[:, 1::2] <= inp["height"]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < num_classes)).all()
        if is_inst:
            assert inst.pred_masks.shape == (len(inst), inp["height"], inp["width"])
