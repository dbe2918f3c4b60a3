"""Turn stride-s mask probabilities into binary masks at the original image size (as the official
implementation's post-processing does).

Shape legend: M detections, h_s×w_s the mask-feature map of the padded network input at stride s,
h×w the un-padded network input (resized image), H×W the original image.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .mask_branch import aligned_bilinear

# Upsampled float maps of a chunk are (chunk, padded h, padded w); bounding the chunk keeps peak
# memory independent of the number of detections (500 full-size float masks would be GBs).
DEFAULT_CHUNK = 64


def masks_to_image(
    mask_probs: torch.Tensor,
    stride: int,
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    boxes: Optional[torch.Tensor] = None,
    threshold: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Upsample, crop, resize, binarize and (optionally) clip masks to their boxes.

    Steps: ``aligned_bilinear`` ×stride to the padded input size; crop [:h, :w]; bilinear resize
    (align_corners=False) to (H, W); ``> threshold``; then, when boxes are given, zero every pixel
    outside ``[int(y1):int(y2), int(x1):int(x2)]`` (coordinates truncated toward zero, last row and
    column of the box excluded), as the official ``clip_mask`` does.

    Args:
        mask_probs: (M, h_s, w_s) probabilities (after sigmoid).
        stride: positive int, the mask-feature stride (4).
        image_size: (h, w) un-padded network-input size; h ≤ stride·h_s, w ≤ stride·w_s.
        output_size: (H, W) original image size.
        boxes: (M, 4) abs xyxy boxes in the (H, W) frame, already scaled and clipped, or None.
        threshold: probability above which a pixel is foreground.
        chunk_size: masks processed per step, bounding peak memory.

    Returns:
        (M, H, W) bool masks on mask_probs' device.
    """
    if mask_probs.dim() != 3:
        raise ValueError(f"mask_probs must be (M, h_s, w_s), got shape {tuple(mask_probs.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_masks, feat_h, feat_w = mask_probs.shape
    img_h, img_w = int(image_size[0]), int(image_size[1])
    out_h, out_w = int(output_size[0]), int(output_size[1])
    if img_h > stride * feat_h or img_w > stride * feat_w:
        raise ValueError(
            f"image_size {img_h}×{img_w} exceeds the padded size "
            f"{stride * feat_h}×{stride * feat_w} of the {feat_h}×{feat_w} map at stride {stride}"
        )
    if boxes is not None and boxes.shape != (num_masks, 4):
        raise ValueError(f"boxes must be ({num_masks}, 4), got {tuple(boxes.shape)}")

    result = torch.zeros((num_masks, out_h, out_w), dtype=torch.bool, device=mask_probs.device)
    if boxes is not None:
        # int() of a float truncates toward zero, as the official int cast does.
        int_boxes = [[int(v) for v in box] for box in boxes.tolist()]
    for start in range(0, num_masks, chunk_size):
        chunk = mask_probs[start : start + chunk_size]
        # aligned_bilinear/interpolate need a float dtype and a channel axis.
        up = aligned_bilinear(chunk.float().unsqueeze(1), stride)[:, :, :img_h, :img_w]
        up = F.interpolate(up, size=(out_h, out_w), mode="bilinear", align_corners=False)
        binary = up[:, 0] > threshold
        if boxes is None:
            result[start : start + len(chunk)] = binary
            continue
        for offset in range(len(chunk)):
            x1, y1, x2, y2 = int_boxes[start + offset]
            # Negative ends would wrap around in a Python slice; boxes are clipped, so clamp at 0.
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), max(x2, 0), max(y2, 0)
            result[start + offset, y1:y2, x1:x2] = binary[offset, y1:y2, x1:x2]
    return result
