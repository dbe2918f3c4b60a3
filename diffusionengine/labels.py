"""Turn the detector's raw predictions on a generated image into its labels.

DiffusionEngine (arXiv 2309.03893, "Data scaling-up") keeps a predicted box when its score
exceeds δ = 0.3; the rest of the rules here keep the written json clean: class-wise NMS, boxes
clipped to the image, degenerate boxes dropped, an optional class allow-list and a cap.

Shape shorthand: N predictions of one image, M kept ones. Boxes are abs xyxy in pixels of the
(H, W) image.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torchvision.ops import batched_nms

__all__ = ["FilteredLabels", "filter_labels"]


@dataclass
class FilteredLabels:
    """Kept predictions, by descending score.

    Attributes:
        indices: (M,) long, positions of the kept predictions in the inputs.
        boxes: (M, 4) float abs xyxy, clipped to the image.
        scores: (M,) float.
        classes: (M,) long, contiguous class ids.
    """

    indices: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())


def filter_labels(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    image_size: Tuple[int, int],
    *,
    score_thresh: float,
    nms_thresh: float,
    min_size: float,
    max_per_image: int,
    allowed_classes: Optional[Sequence[int]] = None,
) -> FilteredLabels:
    """Keep the predictions worth writing as labels of a generated image.

    In order: (1) score > ``score_thresh`` (strict: the paper's δ), (2) class allow-list,
    (3) class-wise NMS at IoU ``nms_thresh`` (torchvision ``batched_nms``), (4) clip to the
    image, (5) drop boxes whose clipped width or height is < ``min_size`` px, (6) keep the
    ``max_per_image`` best scores (0 = no cap).

    Args:
        boxes: (N, 4) abs xyxy.
        scores: (N,) in [0, 1].
        classes: (N,) integer class ids.
        image_size: (h, w) of the image in pixels.
        allowed_classes: class ids to keep; None or empty keeps every class.

    Returns:
        :class:`FilteredLabels` sorted by descending score (ties by input position).
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1] or classes.shape != boxes.shape[:1]:
        raise ValueError(
            f"filter_labels needs boxes (N, 4), scores (N,), classes (N,); got {tuple(boxes.shape)},"
            f" {tuple(scores.shape)}, {tuple(classes.shape)}"
        )
    if max_per_image < 0:
        raise ValueError(f"max_per_image must be >= 0 (0 = no cap), got {max_per_image}")
    h, w = image_size
    boxes, scores, classes = boxes.float(), scores.float(), classes.long()
    keep = torch.nonzero(scores > score_thresh).flatten()  # (N',)
    if allowed_classes:
        allowed = torch.as_tensor(list(allowed_classes), dtype=torch.long, device=classes.device)
        keep = keep[torch.isin(classes[keep], allowed)]
    keep = keep[batched_nms(boxes[keep], scores[keep], classes[keep], nms_thresh)]
    # batched_nms sorts by score but not stably: equal scores go back to their input order, so
    # the cap below keeps the same boxes on every device.
    keep = keep.sort().values
    keep = keep[torch.sort(scores[keep], descending=True, stable=True).indices]
    clipped = boxes[keep].clone()  # (M', 4)
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h)
    large = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
    keep, clipped = keep[large], clipped[large]
    if max_per_image:
        keep, clipped = keep[:max_per_image], clipped[:max_per_image]
    return FilteredLabels(indices=keep, boxes=clipped, scores=scores[keep], classes=classes[keep])
