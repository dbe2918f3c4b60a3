"""Label quality and cost of the data engine, for the DiffusionEngine demo job
(:mod:`diffusionengine.main_job`).

Ground truth for generated images: image-to-image from an annotated TRAIN reference at a
limited strength (encoding ratio) keeps the reference's objects where they were, so the
reference's boxes are the generated image's ground truth. The data engine labels each generated
image from its own last denoising step (DiffusionEngine, arXiv 2309.03893, "Data scaling-up");
here its labels at several score thresholds δ are matched to that ground truth.

Shape shorthand: M labels, G ground-truth boxes of one image; boxes are abs xyxy pixels.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou

from .image_grid import draw_boxes, grid, write_rgb
from .labels import filter_labels
from .prompts import MAX_CLASS_NAMES, class_prompt

__all__ = ["LabelledSample", "References", "count_matches", "label_references", "load_references",
           "precision_recall", "time_labelled_images", "write_label_grid"]


@dataclass
class LabelledSample:
    """Predicted labels (by descending score) of one image and its ground truth.

    Attributes:
        image: (H, W, 3) uint8 RGB; boxes (M, 4), classes (M,), scores (M,); gt_boxes (G, 4),
        gt_classes (G,). Classes are contiguous ids.
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    gt_boxes: np.ndarray
    gt_classes: np.ndarray


@dataclass
class References:
    """Annotated reference images resized to (size, size): images (N, size, size, 3) uint8 RGB,
    per image boxes (G, 4) abs xyxy and classes (G,) contiguous ids; names = file names."""

    images: np.ndarray
    boxes: List[np.ndarray]
    classes: List[np.ndarray]
    names: List[str]
    class_names: List[str]


def load_references(json_file: str, image_root: str, num: int, size: int, seed: int) -> References:
    """``num`` images drawn (seeded, without replacement) from a COCO json, resized to (size,
    size) with their boxes (COCO abs xywh -> abs xyxy, scaled)."""
    with open(json_file) as f:
        coco = json.load(f)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: k for k, c in enumerate(categories)}
    per_image: Dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    order = np.random.default_rng(seed).permutation(len(coco["images"]))[:num]
    images, boxes, classes, names = [], [], [], []
    for i in sorted(order.tolist()):
        im = coco["images"][i]
        bgr = cv2.imread(os.path.join(image_root, im["file_name"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read {os.path.join(image_root, im['file_name'])} ({json_file})")
        sy, sx = size / bgr.shape[0], size / bgr.shape[1]
        images.append(cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)[:, :, ::-1])
        xywh = np.array([a["bbox"] for a in per_image[im["id"]]], np.float32).reshape(-1, 4)
        boxes.append(np.stack([xywh[:, 0] * sx, xywh[:, 1] * sy, (xywh[:, 0] + xywh[:, 2]) * sx,
                               (xywh[:, 1] + xywh[:, 3]) * sy], axis=1))  # (G, 4) abs xyxy
        classes.append(np.array([contiguous[a["category_id"]] for a in per_image[im["id"]]], np.int64))
        names.append(im["file_name"])
    return References(np.ascontiguousarray(np.stack(images)), boxes, classes, names,
                      [c["name"] for c in categories])


def count_matches(boxes, classes, gt_boxes, gt_classes, iou_thresh: float = 0.5) -> int:
    """True positives of (M, 4) predictions taken by descending score (the caller's order):
    each matches the unmatched ground-truth box of its class with the highest IoU >= iou_thresh."""
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return 0
    iou = box_iou(torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(gt_boxes, dtype=torch.float32))
    iou[torch.as_tensor(classes)[:, None] != torch.as_tensor(gt_classes)[None, :]] = -1.0  # (M, G)
    taken, hits = torch.zeros(len(gt_boxes), dtype=torch.bool), 0
    for row in iou:
        row = row.masked_fill(taken, -1.0)
        best = int(row.argmax())
        if row[best] >= iou_thresh:
            taken[best], hits = True, hits + 1
    return hits


def precision_recall(samples: Sequence[LabelledSample], deltas: Sequence[float], iou_thresh: float = 0.5) -> List[Dict]:
    """Per δ: labels = predictions with score > δ; precision = matched labels / labels, recall
    = matched ground truth / ground truth, pooled over the images (NaN precision without labels)."""
    rows = []
    for delta in deltas:
        tp = n_pred = n_gt = 0
        for s in samples:
            keep = s.scores > delta
            tp += count_matches(s.boxes[keep], s.classes[keep], s.gt_boxes, s.gt_classes, iou_thresh)
            n_pred, n_gt = n_pred + int(keep.sum()), n_gt + len(s.gt_boxes)
        rows.append({"delta": float(delta), "precision": tp / n_pred if n_pred else float("nan"),
                     "recall": tp / n_gt if n_gt else float("nan"), "labels_per_image": n_pred / max(1, len(samples)),
                     "gt_per_image": n_gt / max(1, len(samples)), "true_positives": tp})
    return rows


def _prompt(refs: References, i: int) -> str:
    present = sorted(set(refs.classes[i].tolist()))[:MAX_CLASS_NAMES]
    return class_prompt([refs.class_names[k] for k in present]) if present else ""


def label_references(engine, refs: References, *, strength: float, seeds: Sequence[int], batch_size: int,
                     progress=None, **generate_kwargs) -> Tuple[List[LabelledSample], List[LabelledSample]]:
    """Image-to-image from every reference at ``strength`` with the data engine's labels, and the
    same detector on the references themselves (no generation): two lists of samples whose
    ground truth is the reference's boxes. ``generate_kwargs``: guidance, steps, scheduler."""
    generated, real = [], []
    size = refs.images.shape[1:3]
    for start in range(0, len(refs.images), batch_size):
        idx = list(range(start, min(start + batch_size, len(refs.images))))
        out = engine.generate([_prompt(refs, i) for i in idx], [refs.images[i] for i in idx],
                              seeds=[seeds[i] for i in idx], strength=strength, size=tuple(size),
                              ref_names=[refs.names[i] for i in idx], **generate_kwargs)
        generated += [LabelledSample(g.image, g.boxes, g.classes, g.scores, refs.boxes[i], refs.classes[i])
                      for g, i in zip(out, idx)]
        real += [LabelledSample(refs.images[i], *p, refs.boxes[i], refs.classes[i])
                 for i, p in zip(idx, _detect(engine, refs.images[idx], [seeds[i] for i in idx]))]
        if progress is not None:
            progress.update(len(idx))
    return generated, real


@torch.no_grad()
def _detect(engine, images: np.ndarray, seeds: Sequence[int]):
    """The engine's detector and labelling rules on (B, H, W, 3) uint8 RGB images."""
    from diffusiondet.utils.rng_state import seeded_rngs

    model = engine.model
    h, w = images.shape[1:3]
    results = []
    for image, seed in zip(images, seeds):  # each image seeded alone: no dependence on the batch
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))  # (3, H, W) RGB
        with seeded_rngs(int(seed) % 2**63):
            inst = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
        kept = filter_labels(inst.pred_boxes.tensor, inst.scores, inst.pred_classes, (h, w), **engine.label_rules)
        results.append((kept.boxes.numpy(), kept.classes.numpy(), kept.scores.numpy()))
    return results


def time_labelled_images(engine, prompts: Sequence[str], size: int, seeds: Sequence[int], **generate_kwargs) -> Dict:
    """CPU seconds (all threads, ``time.process_time``) and wall seconds per labelled image of
    one text-to-image call of len(prompts) images at (size, size), after a one-image warm-up."""
    engine.generate(list(prompts[:1]), seeds=list(seeds[:1]), size=(size, size), **generate_kwargs)
    cpu, wall = time.process_time(), time.perf_counter()
    engine.generate(list(prompts), seeds=list(seeds), size=(size, size), **generate_kwargs)
    n = len(prompts)
    return {"size": size, "images": n, "cpu_seconds_per_image": (time.process_time() - cpu) / n,
            "wall_seconds_per_image": (time.perf_counter() - wall) / n, "threads": torch.get_num_threads()}


def write_label_grid(path: str, generated: Sequence[LabelledSample], real: Sequence[LabelledSample],
                     class_names: Sequence[str], delta: float, extra: Sequence[LabelledSample] = (),
                     columns: int = 4, caption: str = "") -> None:
    """Rows: references with their ground truth, the generated images with their labels (score
    > delta), and optionally more generated images (``extra``) with theirs."""
    def labelled(s, gt=False):
        if gt:
            return draw_boxes(s.image, s.gt_boxes, s.gt_classes, class_names)
        keep = s.scores > delta
        return draw_boxes(s.image, s.boxes[keep], s.classes[keep], class_names)

    rows = [[labelled(s, gt=True) for s in real[:columns]], [labelled(s) for s in generated[:columns]]]
    captions = ["TRAIN references, ground truth", f"img2img{caption}, labels (score > {delta})"]
    if extra:
        rows.append([labelled(s) for s in extra[:columns]])
        captions.append(f"generated set, labels (score > {delta})")
    write_rgb(path, grid(rows, captions))
