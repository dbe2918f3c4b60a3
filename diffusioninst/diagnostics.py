"""Diagnostics of a trained DiffusionInst: is it the boxes or the masks (tools/diagnose_inst.py)?

* :func:`oracle_box_mask_evaluation`: mask AP of the mask branch alone, given the GT boxes;
* :func:`loss_curves` / :func:`write_loss_figure`: the box and mask loss terms over training,
  from detectron2's metrics.json, with their shares of the total at the start and the end;
* :func:`object_size_report`: GT object sizes against the mask feature's stride.

Shape legend: G GT objects of an image, P filter length, C × h × w the mask feature map.
Boxes are abs xyxy in the resized network input unless said otherwise.
"""
import json
import math
import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import detection_utils as d2_utils
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_backbone
from detectron2.structures import BoxMode
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pycocotools import mask as mask_util
from torch import nn

from diffusiondet.data import DiffusionDetDatasetMapper
from diffusiondet.engine import Trainer, load_model_weights
from diffusiondet.modeling.inference import to_fp32

__all__ = [
    "GroundTruthBoxPredictor",
    "QUANTILES",
    "backbone_geometry",
    "loss_curves",
    "object_size_report",
    "oracle_box_mask_evaluation",
    "write_loss_figure",
]

# Quantiles of the object-size report.
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# The size report counts the objects smaller than these many mask cells (sqrt area / stride).
CELL_LIMITS = (2, 4)


# ------------------------------------------------------------------ masks given the GT boxes
class GroundTruthBoxPredictor(nn.Module):
    """A DiffusionInst whose detections are the GT boxes of each image, with their masks.

    Per image (inputs carry ``instances`` with ``gt_boxes`` in the network-input frame and
    ``gt_classes``): the G GT boxes are the proposals of one model call
    (:meth:`DiffusionDet.denoise`) at timestep ``timestep``, with no other proposal; the mask
    filters of that call's final stage (the stage inference uses) are run on the image's mask
    feature. The detections are the GT boxes with their GT classes and score 1; the head's
    refined boxes and class scores are not used. Post-processing is the model's own
    (``postprocess_detections``: resize to the original image, then the masks are upsampled,
    thresholded and, with CLIP_MASKS_TO_BOXES, zeroed outside the GT box).
    """

    def __init__(self, model: nn.Module, timestep: int):
        super().__init__()
        if not 0 <= timestep < model.num_timesteps:
            raise ValueError(f"timestep must be in [0, {model.num_timesteps}), got {timestep}")
        self.model = model
        self.timestep = int(timestep)

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        model = self.model
        images, _, features = model.inference_features(batched_inputs)
        contexts = model.image_contexts(batched_inputs, images, features)
        outputs = []
        for b, (x, ctx) in enumerate(zip(batched_inputs, contexts)):
            gt = x["instances"].to(model.device)
            boxes = gt.gt_boxes.tensor.float()  # (G, 4)
            kernels = boxes.new_zeros((0, model.head.mask_head_spec.num_params))  # (0, P)
            if len(boxes):
                t = torch.full((1,), self.timestep, dtype=torch.long, device=model.device)
                with model.inference_autocast():
                    out = model.denoise([f[b : b + 1] for f in features], boxes[None], t)
                kernels = to_fp32(out["pred_kernels"][0])  # (G, P), final stage
            det = {
                "boxes": boxes,
                "scores": torch.ones(len(boxes), device=model.device),
                "classes": gt.gt_classes.long(),
                "pred_kernels": kernels,
            }
            outputs.append({"instances": model.postprocess_detections(det, ctx)})
        return outputs


def gt_box_mapper(cfg) -> DiffusionDetDatasetMapper:
    """The test-time mapper (MIN_SIZE_TEST resize only) that keeps the boxes and classes: the
    training mode of the mapper, with the test augmentation (crowd objects dropped)."""
    return DiffusionDetDatasetMapper(
        is_train=True,
        augmentations=d2_utils.build_augmentation(cfg, is_train=False),
        image_format=cfg.INPUT.FORMAT,
        mask_on=False,
    )


def oracle_box_mask_evaluation(cfg, weights: str, timestep: Optional[int] = None,
                               output_folder: Optional[str] = None) -> Dict:
    """COCO bbox and segm AP on DATASETS.TEST[0] of ``weights``' masks for the GT boxes.

    Given: every GT box (test-resized), its GT class and score 1; predicted: the mask of each
    (see :class:`GroundTruthBoxPredictor`). Box AP is thus ~100 by construction and mask AP
    measures the mask branch and filters alone. ``timestep`` (default T − 1, the t of the only
    model call at SAMPLE_STEP 1) is the t the head sees; 0 means "the boxes are exact".

    Returns:
        detectron2's results dict: {"bbox": {"AP", ...}, "segm": {"AP", ...}}.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = Trainer.build_model(cfg)
    load_model_weights(model, cfg)
    model.eval()
    timestep = model.num_timesteps - 1 if timestep is None else timestep
    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset, mapper=gt_box_mapper(cfg), batch_size=1)
    evaluator = Trainer.build_evaluator(cfg, dataset, output_folder)
    return inference_on_dataset(GroundTruthBoxPredictor(model, timestep), loader, evaluator)


# ------------------------------------------------------------------------------ loss curves
_STAGE_SUFFIX = re.compile(r"^(loss_\w+?)_(\d+)$")
BOX_TERMS = ("loss_ce", "loss_bbox", "loss_giou")
MASK_TERMS = ("loss_masks",)


def loss_curves(metrics_json_path: str) -> Dict:
    """Loss series of a training from detectron2's metrics.json (one JSON dict per line).

    The criterion's terms are already weighted (``total_loss`` is their sum). Auxiliary stages
    carry a suffix (``loss_ce_0`` … ``loss_ce_{S-2}``; the final stage has none). detectron2
    writes each value as the median over its last 20 iterations, so ``total_loss`` and the sum
    of the terms may differ slightly.

    Returns:
        {"terms": {key: {"iterations": [...], "values": [...]}} for every logged ``loss_*`` key
        and ``total_loss``; "summed": the same for each term summed over stages (``loss_ce``,
        ``loss_bbox``, ``loss_giou``, ``loss_masks``, any other) and for the groups ``box``
        (ce + bbox + giou) and ``mask``, on the iterations where every term was logged;
        "shares": {summed name: {"start", "end"}}: its value over ``total_loss`` at the first
        and the last of those iterations}.
    """
    rows = []
    with open(metrics_json_path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    keys = sorted({k for r in rows for k in r if k.startswith("loss_") or k == "total_loss"})
    terms = {}
    for key in keys:
        points = [(r["iteration"], float(r[key])) for r in rows if key in r]
        terms[key] = {"iterations": [p[0] for p in points], "values": [p[1] for p in points]}
    loss_keys = [k for k in keys if k != "total_loss"]
    complete = [r for r in rows if loss_keys and all(k in r for k in loss_keys)]
    base = {k: (_STAGE_SUFFIX.match(k).group(1) if _STAGE_SUFFIX.match(k) else k) for k in loss_keys}
    iterations = [r["iteration"] for r in complete]
    summed_values = defaultdict(lambda: [0.0] * len(complete))
    for i, r in enumerate(complete):
        for k in loss_keys:
            group = "box" if base[k] in BOX_TERMS else "mask" if base[k] in MASK_TERMS else None
            for name in (base[k], group):
                if name is not None:
                    summed_values[name][i] += float(r[k])
        summed_values["total_loss"][i] = float(r.get("total_loss", sum(float(r[k]) for k in loss_keys)))
    summed = {name: {"iterations": iterations, "values": v} for name, v in summed_values.items()}
    shares = {}
    if complete:
        total = summed["total_loss"]["values"]
        for name, series in summed.items():
            if name != "total_loss":
                shares[name] = {"start": series["values"][0] / total[0], "end": series["values"][-1] / total[-1]}
    return {"terms": terms, "summed": summed, "shares": shares}


def write_loss_figure(curves: Dict, path: str, title: str = "") -> None:
    """PNG of :func:`loss_curves`' summed series (log scale) against the iteration."""
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, series in curves["summed"].items():
        style = "-" if name in ("total_loss", "box", "mask") else "--"
        ax.plot(series["iterations"], series["values"], style, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("weighted loss (sum over stages)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# -------------------------------------------------------------------------- object sizes
def backbone_geometry(cfg) -> Dict:
    """{"strides": {level: stride} of MODEL.DiffusionInst.MASK_IN_FEATURES, "size_divisibility":
    the padding multiple of the network input}, read from the built (untrained) backbone."""
    backbone = build_backbone(cfg)
    shapes = backbone.output_shape()
    return {
        "strides": {name: int(shapes[name].stride) for name in cfg.MODEL.DiffusionInst.MASK_IN_FEATURES},
        "size_divisibility": int(backbone.size_divisibility),
    }


def _polygon_area(segmentation, height: int, width: int) -> Optional[float]:
    """Area in pixels of a COCO segmentation: shoelace sum over polygon parts, or the RLE's."""
    if isinstance(segmentation, list) and segmentation:
        area = 0.0
        for poly in segmentation:
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            area += 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
        return area
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_util.frPyObjects(rle, height, width)
        return float(mask_util.area(rle))
    return None


def _summary(values: Sequence[float], stride: int) -> Dict:
    values = np.asarray(values, float)
    if values.size == 0:
        return {"count": 0}
    return {
        "count": int(values.size),
        "quantiles_px": [float(q) for q in np.quantile(values, QUANTILES)],
        "quantiles_cells": [float(q) for q in np.quantile(values / stride, QUANTILES)],
        "fraction_below_cells": {str(c): float(np.mean(values < c * stride)) for c in CELL_LIMITS},
    }


def object_size_report(cfg, dataset_name: str, geometry: Optional[Dict] = None) -> Dict:
    """GT object sizes of ``dataset_name`` against the mask feature's resolution.

    Sizes are in network-input pixels after the test resize (ResizeShortestEdge with
    MIN_SIZE_TEST / MAX_SIZE_TEST) and in cells of the mask stride (the stride of the first
    MASK_IN_FEATURES level); crowd objects are left out.

    Args:
        geometry: :func:`backbone_geometry` (default: read from ``cfg``'s backbone).

    Returns:
        {"dataset", "num_images", "mask_in_strides", "mask_stride", "mask_map_hw" (median
        padded input size / stride), "quantiles" (:data:`QUANTILES`), and per measure
        ("box_sqrt_area", "box_short_side", "mask_sqrt_area") a summary {"count",
        "quantiles_px", "quantiles_cells", "fraction_below_cells": {"2": …, "4": …}}}.
    """
    geometry = geometry or backbone_geometry(cfg)
    strides = geometry["strides"]
    stride = strides[cfg.MODEL.DiffusionInst.MASK_IN_FEATURES[0]]
    divisor = max(geometry["size_divisibility"], 1)
    records = DatasetCatalog.get(dataset_name)
    measures = defaultdict(list)
    padded = []
    for record in records:
        height, width = record["height"], record["width"]
        new_h, new_w = height, width
        if cfg.INPUT.MIN_SIZE_TEST > 0:
            new_h, new_w = ResizeShortestEdge.get_output_shape(
                height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
            )
        sy, sx = new_h / height, new_w / width
        padded.append((math.ceil(new_h / divisor) * divisor, math.ceil(new_w / divisor) * divisor))
        for anno in record.get("annotations", []):
            if anno.get("iscrowd", 0):
                continue
            box = BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
            w, h = (box[2] - box[0]) * sx, (box[3] - box[1]) * sy
            measures["box_sqrt_area"].append(math.sqrt(max(w * h, 0.0)))
            measures["box_short_side"].append(min(w, h))
            area = _polygon_area(anno.get("segmentation"), height, width)
            if area is not None:
                measures["mask_sqrt_area"].append(math.sqrt(area * sx * sy))
    median_hw = np.median(np.asarray(padded, float), axis=0) if padded else np.zeros(2)
    report = {
        "dataset": dataset_name,
        "num_images": len(records),
        "mask_in_strides": dict(strides),
        "mask_stride": stride,
        "mask_map_hw": [float(v) / stride for v in median_hw],
        "quantiles": list(QUANTILES),
    }
    for name in ("box_sqrt_area", "box_short_side", "mask_sqrt_area"):
        report[name] = _summary(measures[name], stride)
    return report
