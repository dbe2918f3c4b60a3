"""Merging the detections of the test-time-augmented views of one image (docs/tta.md).

Pure functions on tensors; nothing here knows the model. Shape legend: M detections of all views
of one image together, M' merged detections. Boxes are abs xyxy in the ORIGINAL image (every view
already mapped back), scores (M,) float, classes (M,) long.

Every merge returns a :class:`MergedDetections` whose ``source`` (M',) names, per merged row, the
input row whose per-detection fields (e.g. DiffusionInst's mask) it carries: the highest-scoring
member of its cluster. Binary masks of different views cannot be averaged into a probability
without the views' mask logits, and the top member's mask is the one that best matches the
fused box (its box weighs most in the fused mean), so a cluster keeps that mask.

Merges (all class-wise: boxes of different classes never merge):
  * ``nms``: torchvision's batched NMS, survivors unchanged (detectron2's TTA merge).
  * ``soft_vote``: the official box voting. Take the top box, its cluster is every remaining box
    with IoU >= 0.65 to it; the cluster becomes one box, the score-weighted mean of its members,
    scored with the top score; every other member is also kept as it is, with its score decayed
    to score * (1 - IoU), when that is >= 0.05.
  * ``wbf``: weighted box fusion (Solovyev et al., 2021, arXiv 1910.13302): boxes in score order
    join the cluster whose FUSED box they overlap most when that IoU > 0.55, else open one; a
    fused box is its members' score-weighted mean, its score the members' mean score times
    min(#members, #views) / #views (a box found by few views counts less).
"""
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

__all__ = [
    "MERGES", "MergedDetections", "merge_detections", "nms_merge", "soft_vote_merge", "wbf_merge",
    "in_scale_range",
]

MERGES = ("nms", "soft_vote", "wbf")
# The official soft vote: cluster at IoU >= 0.65 to the top box, keep decayed members >= 0.05.
SOFT_VOTE_IOU = 0.65
SOFT_VOTE_MIN_SCORE = 0.05
# WBF's paper default for the IoU to a fused box above which a box joins its cluster.
WBF_IOU = 0.55


class MergedDetections(NamedTuple):
    """Merged detections, sorted by score descending.

    boxes (M', 4) abs xyxy, scores (M',), classes (M',) long, source (M',) long: the input row
    whose mask (or any other per-detection field) each merged row carries.
    """

    boxes: Tensor
    scores: Tensor
    classes: Tensor
    source: Tensor


def _sorted(boxes: Tensor, scores: Tensor, classes: Tensor, source: Tensor) -> MergedDetections:
    order = torch.argsort(scores, descending=True, stable=True)
    return MergedDetections(boxes[order], scores[order], classes[order], source[order])


def _empty_like(boxes: Tensor, scores: Tensor, classes: Tensor) -> MergedDetections:
    none = torch.zeros(0, dtype=torch.long, device=boxes.device)
    return MergedDetections(boxes[none], scores[none], classes[none], none)


def _concatenated(boxes: List[Tensor], scores: List[Tensor], classes: List[Tensor], source: List[Tensor],
                  like) -> MergedDetections:
    """The per-cluster pieces of a merge, joined and sorted best first (empty like ``like``, the
    inputs (boxes, scores, classes), when there are none)."""
    if not source:
        return _empty_like(*like)
    return _sorted(torch.cat(boxes), torch.cat(scores), torch.cat(classes), torch.cat(source))


def _weighted_mean(boxes: Tensor, weights: Tensor) -> Tensor:
    """(K, 4) boxes, (K,) weights -> (4,) score-weighted mean; plain mean if the weights sum to 0."""
    if float(weights.sum()) <= 0:
        weights = torch.ones_like(weights)
    return (boxes * weights[:, None]).sum(0) / weights.sum()


def nms_merge(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> MergedDetections:
    """Class-wise NMS: same-class boxes with IoU > ``iou_threshold`` to a better one are dropped."""
    keep = batched_nms(boxes.float(), scores.float(), classes, iou_threshold)
    return MergedDetections(boxes[keep], scores[keep], classes[keep], keep)


def soft_vote_merge(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    iou_threshold: float = SOFT_VOTE_IOU,
    min_score: float = SOFT_VOTE_MIN_SCORE,
) -> MergedDetections:
    """The official class-wise soft box voting (module docstring). A cluster of one box is kept
    as it is; the fused box's ``source`` is the cluster's top box."""
    out_boxes, out_scores, out_classes, out_source = [], [], [], []
    for cls in torch.unique(classes).tolist():
        index = torch.nonzero(classes == cls).flatten()
        index = index[torch.argsort(scores[index], descending=True, stable=True)]
        while index.numel() > 0:
            iou = box_iou(boxes[index[:1]].float(), boxes[index].float())[0]
            member = iou >= iou_threshold
            member[0] = True  # the top box, even when empty (IoU 0/0 is NaN)
            rows, member_iou = index[member], iou[member]
            index = index[~member]
            top = rows[:1]
            kept_boxes, kept_scores, kept_source = boxes[top], scores[top], top
            if rows.numel() > 1:
                fused = _weighted_mean(boxes[rows], scores[rows]).to(boxes.dtype)
                decayed = (scores[rows[1:]] * (1 - member_iou[1:])).to(scores.dtype)
                extra = decayed >= min_score
                kept_boxes = torch.cat([fused[None], boxes[rows[1:][extra]]])
                kept_scores = torch.cat([scores[top], decayed[extra]])
                kept_source = torch.cat([top, rows[1:][extra]])
            out_boxes.append(kept_boxes)
            out_scores.append(kept_scores)
            out_classes.append(classes[kept_source])
            out_source.append(kept_source)
    return _concatenated(out_boxes, out_scores, out_classes, out_source, like=(boxes, scores, classes))


def wbf_merge(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    num_views: int,
    iou_threshold: float = WBF_IOU,
) -> MergedDetections:
    """Class-wise weighted box fusion over ``num_views`` views (module docstring); a cluster's
    ``source`` is its first (highest-scoring) member."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    out_boxes, out_scores, out_classes, out_source = [], [], [], []
    for cls in torch.unique(classes).tolist():
        index = torch.nonzero(classes == cls).flatten()
        index = index[torch.argsort(scores[index], descending=True, stable=True)]
        members = []  # per cluster: input rows, best first
        fused = boxes.new_zeros((0, 4))  # (clusters, 4)
        for row in index.tolist():
            if members:
                iou = box_iou(boxes[row : row + 1].float(), fused.float())[0]
                best = int(iou.argmax())
                if iou[best] > iou_threshold:
                    members[best].append(row)
                    fused[best] = _weighted_mean(boxes[members[best]], scores[members[best]])
                    continue
            members.append([row])
            fused = torch.cat([fused, boxes[row : row + 1]])
        for cluster, box in zip(members, fused):
            weight = min(len(cluster), num_views) / num_views
            out_boxes.append(box[None])
            out_scores.append((scores[cluster].mean() * weight)[None])
            out_classes.append(classes[cluster[:1]])
            out_source.append(torch.tensor(cluster[:1], dtype=torch.long, device=boxes.device))
    return _concatenated(out_boxes, out_scores, out_classes, out_source, like=(boxes, scores, classes))


def merge_detections(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    method: str,
    *,
    num_views: int = 1,
    nms_threshold: float = 0.5,
    masks: Optional[Tensor] = None,
):
    """Merge the views' detections of one image with ``method`` (one of :data:`MERGES`).

    Args:
        boxes: (M, 4) abs xyxy in the original image; scores (M,); classes (M,) long.
        method: "nms" (IoU ``nms_threshold``), "soft_vote" or "wbf" (over ``num_views`` views).
        masks: optional (M, H, W) masks; each merged row gets the mask of its ``source`` row.

    Returns:
        (:class:`MergedDetections` on the device of ``boxes``, masks (M', H, W) or None), sorted
        by score descending.
    """
    if method not in MERGES:
        raise ValueError(f"merge method must be one of {MERGES}, got {method!r}")
    device = boxes.device
    # The voting loops take one small step per cluster or box: on a GPU each would wait for the
    # device, so the (few thousand) rows are merged on the CPU.
    boxes, scores, classes = boxes.cpu(), scores.cpu(), classes.cpu()
    if method == "nms":
        merged = nms_merge(boxes, scores, classes, nms_threshold)
    elif method == "soft_vote":
        merged = soft_vote_merge(boxes, scores, classes)
    else:
        merged = wbf_merge(boxes, scores, classes, num_views)
    merged = MergedDetections(*(field.to(device) for field in merged))
    return merged, (None if masks is None else masks[merged.source.to(masks.device)])


def in_scale_range(boxes: Tensor, low: float, high: float) -> Tensor:
    """(M,) bool: sqrt(area) of each (M, 4) abs xyxy box lies in [low, high] (both inclusive),
    the official per-scale filter of TEST.AUG.SCALE_RANGES (areas in original-image pixels)."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    side = torch.sqrt(widths * heights)
    return (side >= low) & (side <= high)
