"""Per-proposal predictions -> detection candidates; ensemble merge, NMS, cap (as the official
implementation selects and merges them).

Shape legend: B images, N proposals, K classes (K + 1 logits on the softmax path, background
last), M candidates of one image. Boxes are abs xyxy in the network input image.

A "candidate dict" of one image maps ``boxes`` (M, 4), ``scores`` (M,), ``classes`` (M,) long and
any extra per-proposal field (M, ...) (e.g. DiffusionInst's mask filters) to tensors that are kept
row-aligned by every function here.
"""
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from detectron2.layers import batched_nms

CandidateDict = Dict[str, Tensor]


def topk_candidates(
    logits: Tensor,
    boxes: Tensor,
    extras: Dict[str, Tensor],
    num_keep: int,
    use_focal: bool,
) -> List[CandidateDict]:
    """:func:`topk_candidate_fields`, split into B candidate dicts (one per image)."""
    fields = topk_candidate_fields(logits, boxes, extras, num_keep, use_focal)
    return [{name: value[b] for name, value in fields.items()} for b in range(logits.shape[0])]


def topk_candidate_fields(
    logits: Tensor,
    boxes: Tensor,
    extras: Dict[str, Tensor],
    num_keep: int,
    use_focal: bool,
) -> CandidateDict:
    """Select the best (proposal, class) pairs of every image.

    Sigmoid (focal / federated) path: scores = sigmoid(logits) flattened over N·K, top-``num_keep``
    entries; class = flat index mod K, proposal = flat index div K, so one proposal may appear
    with several classes. Softmax path: one candidate per proposal, its best non-background class
    (softmax over K + 1, background = last column), then top-``num_keep`` of those.

    Args:
        logits: (B, N, K) sigmoid logits, or (B, N, K + 1) softmax logits.
        boxes: (B, N, 4) abs xyxy.
        extras: name -> (B, N, ...) extra per-proposal fields, gathered like ``boxes``.
        num_keep: candidates per image (N officially); capped at what exists.
        use_focal: sigmoid path if True, softmax path otherwise.

    Returns:
        one candidate dict of (B, M, ...) fields with M = min(num_keep, N·K) (sigmoid) or
        min(num_keep, N) (softmax), each image's rows sorted by score descending.
    """
    batch, num_proposals, num_logits = logits.shape
    if use_focal:
        flat_scores = torch.sigmoid(logits).flatten(1)  # (B, N*K)
        scores, flat_index = flat_scores.topk(min(num_keep, flat_scores.shape[1]), dim=1)
        classes = flat_index % num_logits
        proposal = torch.div(flat_index, num_logits, rounding_mode="floor")
    else:
        foreground = torch.softmax(logits, dim=-1)[..., :-1]
        best_scores, best_classes = foreground.max(dim=-1)  # (B, N)
        scores, proposal = best_scores.topk(min(num_keep, num_proposals), dim=1)
        classes = torch.gather(best_classes, 1, proposal)
    image_index = torch.arange(batch, device=logits.device)[:, None]  # (B, 1)
    fields = {"boxes": boxes[image_index, proposal], "scores": scores, "classes": classes}
    for name, value in extras.items():
        fields[name] = value[image_index, proposal]  # (B, M, ...)
    return fields


def merge_candidates(candidates: Sequence[CandidateDict]) -> CandidateDict:
    """Concatenate the candidate dicts of one image (e.g. one per sampling step) along dim 0."""
    if len(candidates) == 0:
        raise ValueError("merge_candidates needs at least one candidate dict")
    keys = candidates[0].keys()
    for cand in candidates[1:]:
        if cand.keys() != keys:
            raise ValueError(
                f"candidate dicts have different fields: {set(keys)} vs {set(cand.keys())}"
            )
    return {name: torch.cat([cand[name] for cand in candidates], dim=0) for name in keys}


def select_rows(cand: CandidateDict, index: Tensor) -> CandidateDict:
    """Index every field of a candidate dict with the same (M',) long index or (M,) bool mask."""
    return {name: value[index] for name, value in cand.items()}


def nms_candidates(cand: CandidateDict, iou_threshold: float) -> CandidateDict:
    """Class-aware NMS (boxes of different classes never suppress each other).

    Args:
        cand: candidate dict with ``boxes`` (M, 4) abs xyxy, ``scores`` (M,), ``classes`` (M,).
        iou_threshold: boxes of the same class with IoU > threshold are suppressed.

    Returns:
        the surviving rows of every field, sorted by score descending.
    """
    # detectron2's batched_nms casts boxes to float32 and torchvision's kernel rejects scores of
    # another dtype, e.g. from a float64 or half head.
    keep = batched_nms(cand["boxes"], cand["scores"].float(), cand["classes"], iou_threshold)
    return select_rows(cand, keep)


def sort_by_score(cand: CandidateDict) -> CandidateDict:
    """Rows of every field reordered by score descending."""
    return select_rows(cand, torch.argsort(cand["scores"], descending=True, stable=True))


def cap_detections(cand: CandidateDict, max_detections: int) -> CandidateDict:
    """The ``max_detections`` highest-scoring rows, sorted by score; ``<= 0`` returns ``cand``."""
    if max_detections <= 0:
        return cand
    return {name: value[:max_detections] for name, value in sort_by_score(cand).items()}
