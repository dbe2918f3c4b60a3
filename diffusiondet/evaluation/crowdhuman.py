"""CrowdHuman metrics (AP50, mMR, Recall) with the CrowdDet / Sparse R-CNN protocol, in numpy.

Independent of detectron2 and of any model, so that numbers can be checked against other tools:

    python -m diffusiondet.evaluation.crowdhuman --gt annotation_val.odgt --dt detections.odgt
    python -m diffusiondet.evaluation.crowdhuman --gt annotation_val.odgt --dt results.json \\
        --coco-gt crowdhuman_val.json

print ``{"AP": ..., "mMR": ..., "Recall": ...}`` as one JSON line (fractions, not percentages).

Protocol (full-body boxes; boxes are abs xyxy after reading odgt's ``[x, y, w, h]``):

1. GT boxes whose tag is not ``person`` or whose ``extra.ignore`` is set are *ignore* regions.
2. Detections and GT are clipped to the image: x1 to [0, W-1], y1 to [0, H-1], x2 to [0, W],
   y2 to [0, H].
3. Per image, detections in descending score order take the unmatched real GT box of highest IoU
   if that IoU is strictly > 0.5 (true positive; the GT box is used up). Only when no real box
   matched, a detection whose intersection with an ignore region covers more than half of the
   detection's own area (IoA > 0.5) is dropped: neither true nor false positive. Ignore regions
   absorb any number of detections. Everything else is a false positive (duplicates included).
4. The kept detections of all images form one list sorted by score. AP is the trapezoid area under
   the raw precision-recall points (the segment from recall 0 to the first point is not counted).
   mMR: at each of 9 FPPI values log-spaced over [1e-2, 1], the miss rate at the first list
   position whose FPPI reaches it (the last position if none does); the geometric mean of the 9.
   Recall: with every detection (no cap on detections per image).

Images without any GT box are absent from CrowdHuman's odgt files, so by default an image counts
(for FPPI, and its detections as false positives) only if it has at least one GT or ignore box;
``count_images_without_gt=True`` counts every image of the GT set instead. A counted image without
detections has all its GT boxes missed.

Detection files: an odgt ``dtboxes`` entry is a person when its ``tag`` is absent, ``"person"`` or
the class index 1 (also written ``"1"`` or ``1.0``), as CrowdDet, Sparse R-CNN and Iter-E2EDET
write it; other tags are excluded with a warning, and a file whose detections are all excluded is
an error.
"""
import argparse
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

__all__ = ["CrowdHumanImage", "REFERENCE_FPPI", "evaluate_crowdhuman", "match_image"]

IOU_THRESHOLD = 0.5
# MR^-2: nine FPPI values log-spaced over [10^-2, 10^0].
REFERENCE_FPPI = np.logspace(-2.0, 0.0, 9)


@dataclass
class CrowdHumanImage:
    """Ground truth of one image: ``boxes`` (G, 4) abs xyxy, ``ignore`` (G,) bool, image size
    (``inf`` when unknown: only possible for an image without detections, where clipping changes
    nothing)."""

    width: float
    height: float
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ignore: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def clip_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """(N, 4) abs xyxy clipped as the CrowdHuman tools do (x1, y1 stop one pixel short)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0] = boxes[:, 0].clip(0, width - 1)
    boxes[:, 1] = boxes[:, 1].clip(0, height - 1)
    boxes[:, 2] = boxes[:, 2].clip(0, width)
    boxes[:, 3] = boxes[:, 3].clip(0, height)
    return boxes


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) intersection areas of abs xyxy boxes a (A, 4) and b (B, 4)."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def match_image(
    dt_boxes: np.ndarray, dt_scores: np.ndarray, image: CrowdHumanImage
) -> Tuple[np.ndarray, np.ndarray]:
    """Match one image's detections (step 3 of the protocol).

    Args:
        dt_boxes: (D, 4) abs xyxy, not yet clipped.
        dt_scores: (D,).
        image: the image's ground truth (not yet clipped).

    Returns:
        scores (K,) and is_tp (K,) bool of the K <= D detections kept (those absorbed by an
        ignore region are left out), in descending score order.
    """
    dt = clip_boxes(dt_boxes, image.width, image.height)
    scores = np.asarray(dt_scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    dt, scores = dt[order], scores[order]
    gt = clip_boxes(image.boxes, image.width, image.height)
    ignore = np.asarray(image.ignore, dtype=bool).reshape(-1)
    real, regions = gt[~ignore], gt[ignore]
    inter_real = _intersection(dt, real)  # (D, G_real)
    iou = inter_real / np.maximum(_area(dt)[:, None] + _area(real)[None, :] - inter_real, 1e-12)
    dt_area = np.maximum(_area(dt), 1e-12)
    ioa = _intersection(dt, regions) / dt_area[:, None]  # (D, G_ignore)
    used = np.zeros(len(real), dtype=bool)
    kept, is_tp = [], []
    for d in range(len(dt)):
        candidates = np.where(used, -1.0, iou[d]) if len(real) else np.zeros(0)
        if len(candidates) and candidates.max() > IOU_THRESHOLD:
            used[int(candidates.argmax())] = True
            kept.append(d)
            is_tp.append(True)
        elif len(regions) and ioa[d].max() > IOU_THRESHOLD:
            continue  # inside an ignore region: neither true nor false positive
        else:
            kept.append(d)
            is_tp.append(False)
    return scores[kept], np.asarray(is_tp, dtype=bool)


def _average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    if len(recall) < 2:
        return 0.0
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _log_average_miss_rate(miss_rate: np.ndarray, fppi: np.ndarray) -> float:
    if len(fppi) == 0:
        return 1.0
    positions = [int(np.argmax(fppi >= ref)) if (fppi >= ref).any() else len(fppi) - 1
                 for ref in REFERENCE_FPPI]  # fmt: skip
    rates = miss_rate[positions]
    if (rates <= 0).any():  # the geometric mean of values one of which is 0
        return 0.0
    return float(np.exp(np.mean(np.log(rates))))


def evaluate_crowdhuman(
    ground_truth: Mapping[str, CrowdHumanImage],
    detections: Mapping[str, Tuple[np.ndarray, np.ndarray]],
    count_images_without_gt: bool = False,
) -> Dict[str, float]:
    """AP, mMR and Recall (fractions) of ``detections`` {image id: (boxes (D, 4) abs xyxy,
    scores (D,))} against ``ground_truth`` {image id: CrowdHumanImage}.

    Detections of images that are not in ``ground_truth`` are ignored; see the module docstring
    for images without GT boxes.
    """
    counted = [i for i, img in ground_truth.items() if count_images_without_gt or len(img.boxes)]
    num_gt = sum(int((~np.asarray(ground_truth[i].ignore, dtype=bool)).sum()) for i in counted)
    all_scores, all_tp = [], []
    for image_id in counted:
        boxes, scores = detections.get(image_id, (np.zeros((0, 4)), np.zeros(0)))
        s, tp = match_image(boxes, scores, ground_truth[image_id])
        all_scores.append(s)
        all_tp.append(tp)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp) if all_tp else np.zeros(0, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    tp_cum = np.cumsum(tp[order])
    fp_cum = np.cumsum(~tp[order])
    recall = tp_cum / max(num_gt, 1)
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    fppi = fp_cum / max(len(counted), 1)
    return {
        "AP": _average_precision(recall, precision),
        "mMR": _log_average_miss_rate(1.0 - recall, fppi),
        "Recall": float(recall[-1]) if len(recall) else 0.0,
    }


# ----------------------------------------------------------------------------- files and CLI
def _xywh_to_xyxy(boxes) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def _read_odgt(path: str) -> List[dict]:
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e})") from e
            if not isinstance(record, dict) or "ID" not in record:
                raise ValueError(f"{path}:{number}: an odgt record needs an 'ID'")
            records.append(record)
    return records


def load_odgt_ground_truth(path: str, sizes: Mapping[str, Tuple[float, float]] = None,
                           detected_ids: Optional[Collection[str]] = None):  # fmt: skip
    """{ID: CrowdHumanImage} from an odgt file (full-body ``fbox``); image sizes come from the
    record's ``width`` / ``height`` or else from ``sizes`` {ID: (width, height)}.

    CrowdHuman's own ``annotation_val.odgt`` has no sizes, and an image can be missing from the
    detections too: an image that is not in ``detected_ids`` (IDs with at least one detection) may
    go without a size, since it has nothing to match. ``detected_ids=None``: every image needs one.
    """
    images = {}
    for record in _read_odgt(path):
        image_id = str(record["ID"])
        boxes, ignore = [], []
        for box in record.get("gtboxes", []):
            boxes.append(box["fbox"])
            extra = box.get("extra") or {}
            ignore.append(box.get("tag") != "person" or bool(extra.get("ignore", 0)))
        size = (record.get("width"), record.get("height"))
        if None in size:
            size = (sizes or {}).get(image_id, (None, None))
        if None in size and detected_ids is not None and image_id not in detected_ids:
            size = (float("inf"), float("inf"))
        if None in size:
            raise ValueError(f"{path}: no image size for '{image_id}' (give width/height in the"
                             " records, detections with width/height, or --coco-gt)")
        images[image_id] = CrowdHumanImage(float(size[0]), float(size[1]), _xywh_to_xyxy(boxes),
                                           np.asarray(ignore, dtype=bool))  # fmt: skip
    return images


def _not_a_person(box: Mapping) -> Optional[str]:
    """None if an odgt detection is a person by its ``tag``, else the reason, as the warning says it."""
    if "tag" not in box:
        return None
    tag = box["tag"]
    # bool is an int in Python (True == 1), but a true/false tag is no class index.
    is_index_1 = isinstance(tag, (int, float)) and not isinstance(tag, bool) and tag == 1
    if is_index_1 or tag in ("person", "1"):
        return None
    return f"tag {json.dumps(tag)}"


def load_detections(path: str, coco_gt: str = "", category_id: int = -1):
    """({ID: (boxes (D, 4) abs xyxy, scores (D,))}, {ID: (width, height)}) from odgt ``dtboxes``
    lines (boxes ``[x, y, w, h]``, person tags only: see the module docstring), or from a COCO
    results json whose image ids ``coco_gt`` maps to file names (ID = the stem).

    Raises ValueError if every detection of the file is excluded (by tag, or by ``category_id``).
    """
    detections: Dict[str, Tuple[list, list]] = {}
    sizes: Dict[str, Tuple[float, float]] = {}
    excluded: Counter = Counter()  # {reason: count}
    if coco_gt:
        with open(coco_gt) as f:
            images = json.load(f)["images"]
        names = {im["id"]: os.path.splitext(os.path.basename(im["file_name"]))[0] for im in images}
        sizes = {names[im["id"]]: (im["width"], im["height"]) for im in images}
        with open(path) as f:
            results = json.load(f)
        for r in results:
            if r["image_id"] not in names:
                raise ValueError(f"{path}: image_id {r['image_id']} is not in {coco_gt}")
            if category_id >= 0 and r.get("category_id") != category_id:
                excluded[f"category_id {json.dumps(r.get('category_id'))}"] += 1
                continue
            boxes, scores = detections.setdefault(names[r["image_id"]], ([], []))
            boxes.append(r["bbox"])
            scores.append(r["score"])
        accepted = f"category_id {category_id}"
    else:
        for record in _read_odgt(path):
            image_id = str(record["ID"])
            boxes, scores = detections.setdefault(image_id, ([], []))
            for box in record.get("dtboxes", []):
                reason = _not_a_person(box)
                if reason:
                    excluded[reason] += 1
                    continue
                boxes.append(box["box"])
                scores.append(box["score"])
            if "width" in record and "height" in record:
                sizes[image_id] = (record["width"], record["height"])
        accepted = 'no tag, "person" or 1'
    kept, dropped = sum(len(s) for _, s in detections.values()), sum(excluded.values())
    reasons = ", ".join(f"{n} with {why}" for why, n in excluded.most_common())
    if dropped and not kept:  # an AP of 0 would hide the cause
        raise ValueError(f"{path}: all {dropped} detections were excluded ({reasons}); accepted: {accepted}")
    if dropped and not coco_gt:  # a category filter is the user's own choice, a tag is not
        warnings.warn(f"{path}: excluded {dropped} of {kept + dropped} detections ({reasons});"
                      f" accepted: {accepted}")
    as_arrays = {k: (_xywh_to_xyxy(b), np.asarray(s, dtype=np.float64)) for k, (b, s) in detections.items()}
    return as_arrays, sizes


def main(argv: Iterable[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="ground-truth .odgt (e.g. annotation_val.odgt)")
    parser.add_argument("--dt", required=True, help="detections: .odgt with dtboxes, or a COCO results json")
    parser.add_argument("--coco-gt", default="", help="COCO json of the same images (for a COCO results --dt)")
    parser.add_argument("--category-id", type=int, default=-1, help="COCO results: keep this category only")
    parser.add_argument("--count-images-without-gt", action="store_true",
                        help="count images without any GT box (default: not counted, as CrowdHuman)")
    args = parser.parse_args(argv)
    detections, sizes = load_detections(args.dt, args.coco_gt, args.category_id)
    detected_ids = {image_id for image_id, (_, scores) in detections.items() if len(scores)}
    ground_truth = load_odgt_ground_truth(args.gt, sizes, detected_ids)
    result = evaluate_crowdhuman(ground_truth, detections, args.count_images_without_gt)
    print(json.dumps({k: round(v, 6) for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
