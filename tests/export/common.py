"""Shared pieces of the export tests: tiny random models sized for a fast export, two non-square
images, and the comparison of detections with eager graph mode.

Export time is about linear in the graph's node count (~10 ms a node on one core: capture,
decomposition, translation, onnxscript's optimizer), and about half the nodes are the fixed-shape
pooler's, run once per head stage, with one gather per bilinear tap. Hence a sampling ratio of 1
(4 taps per bin instead of 16: the same code, ~15 % fewer nodes) everywhere, and one head stage
(~35 % fewer) wherever the case is about something else than stages: only the tool's export keeps
TINY_OPTS' two.
"""
import os

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from tests.utils import damp_box_refinements, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Scores are float32 sigmoids (ONNX and ATen kernels differ in rounding); boxes go through the
# stages of an untrained head, which amplify rounding: measured 3e-7 and 2e-5 px (5e-7 and
# 5e-5 px with two stages at 2 steps).
SCORE_ATOL, BOX_ATOL = 1e-5, 1e-3
FEW_TAPS = ("MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 1)
ONE_STAGE = ("MODEL.DiffusionDet.NUM_HEADS", 1)
# The COCO configs' backbone: frozen BatchNorm, folded into the convolutions at inference.
FROZEN_BN = ("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.FPN.NORM", "")


def inputs(first=(64, 80), second=(48, 96)):
    """Two images of different sizes (h, w); the first rescaled 2x by detector_postprocess."""
    images = []
    for seed, (height, width) in enumerate((first, second)):
        g = torch.Generator().manual_seed(seed)
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        images.append({"image": image, "height": height, "width": width})
    images[0].update(height=2 * first[0], width=2 * first[1], image_id=3)
    images[1].update(image_id=11)
    return images


def tiny_model(*opts, config_file="configs/diffdet.synthetic.res18.yaml"):
    """A tiny random graph-mode model (tests.utils.tiny_cfg, FEW_TAPS, SEED 7, then ``opts``)."""
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLING_MODE", "graph", "SEED", 7, *FEW_TAPS, *opts,
                   config_file=config_file)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    damp_box_refinements(model)
    with torch.no_grad():
        # Frozen BN starts as the identity; statistics as after training make the folding (scale
        # into the weights, shift into a bias) change the numbers.
        for norm in model.modules():
            if isinstance(norm, FrozenBatchNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.1)
                norm.running_mean.normal_(0, 0.1)
                norm.running_var.uniform_(0.5, 1.5)
    return model


def assert_same_detections(got, want):
    for a, b in zip(got, want, strict=True):
        a, b = a["instances"], b["instances"]
        assert a.image_size == b.image_size
        assert len(a) == len(b) > 0
        order_a, order_b = torch.argsort(a.scores), torch.argsort(b.scores)
        assert torch.equal(a.pred_classes[order_a], b.pred_classes[order_b])
        torch.testing.assert_close(a.scores[order_a], b.scores[order_b], rtol=0, atol=SCORE_ATOL)
        torch.testing.assert_close(
            a.pred_boxes.tensor[order_a], b.pred_boxes.tensor[order_b], rtol=1e-5, atol=BOX_ATOL
        )
        if b.has("pred_masks"):
            assert (a.pred_masks[order_a] != b.pred_masks[order_b]).float().mean() < 1e-3


def eager(model, batched_inputs):
    with torch.no_grad():
        return model(batched_inputs)


def assert_tool_succeeded(tool_export):
    """The shared tools/export_onnx.py run (conftest's ``tool_export``) exited 0."""
    result = tool_export.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
