"""Conversions between absolute boxes, normalised boxes and the diffusion signal.

Shape legend: B images, N proposals; every function accepts any leading shape ``(..., 4)``.
Box formats:
    abs xyxy     absolute pixel (x1, y1, x2, y2) in the un-padded image;
    norm cxcywh  (cx, cy, w, h) divided by the image (w, h, w, h), nominally in [0, 1];
    signal       ``(norm_cxcywh * 2 - 1) * scale``, nominally in [-scale, scale].
``image_whwh`` is (w, h, w, h) of each UN-PADDED image: (B, 4) for (B, N, 4) boxes, or (4,) for
the boxes of a single image.
"""
import torch
from torch import Tensor


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) x1y1x2y2 -> (..., 4) cxcywh (same units)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) x1y1x2y2 (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _broadcast_whwh(image_whwh: Tensor, boxes: Tensor) -> Tensor:
    # (B, 4) sizes must broadcast over the proposal dim of (B, N, 4) boxes.
    image_whwh = image_whwh.to(boxes.dtype)
    while image_whwh.dim() < boxes.dim():
        image_whwh = image_whwh.unsqueeze(-2)
    return image_whwh


def normalized_cxcywh_to_signal(boxes: Tensor, scale: float) -> Tensor:
    """(..., 4) norm cxcywh in [0, 1] -> (..., 4) signal ``(b * 2 - 1) * scale``."""
    return (boxes * 2.0 - 1.0) * scale


def signal_to_normalized_cxcywh(x: Tensor, scale: float) -> Tensor:
    """(..., 4) signal -> (..., 4) norm cxcywh in [0, 1] (clamps to [-scale, scale] first)."""
    x = torch.clamp(x, min=-scale, max=scale)
    return (x / scale + 1.0) / 2.0


def boxes_to_signal(boxes_xyxy: Tensor, image_whwh: Tensor, scale: float) -> Tensor:
    """Absolute boxes -> diffusion signal (no clamping).

    Args:
        boxes_xyxy: (B, N, 4) abs xyxy.
        image_whwh: (B, 4) (w, h, w, h) of each un-padded image.
        scale: signal scale s (SNR_SCALE, 2.0 officially).

    Returns:
        (B, N, 4) signal, ``boxes_xyxy``' dtype.
    """
    normalized = xyxy_to_cxcywh(boxes_xyxy / _broadcast_whwh(image_whwh, boxes_xyxy))
    return normalized_cxcywh_to_signal(normalized, scale)


def signal_to_boxes(x: Tensor, image_whwh: Tensor, scale: float) -> Tensor:
    """Diffusion signal -> abs boxes: clamp to ±scale, un-scale, cxcywh -> xyxy, × (w, h, w, h).

    Boxes may extend outside the image or be empty (the official mapping does no further clipping).

    Args:
        x: (B, N, 4) signal.
        image_whwh: (B, 4) (w, h, w, h) of each un-padded image.
        scale: signal scale s.

    Returns:
        (B, N, 4) abs xyxy, ``x``' dtype.
    """
    boxes = cxcywh_to_xyxy(signal_to_normalized_cxcywh(x, scale))
    return boxes * _broadcast_whwh(image_whwh, boxes)
