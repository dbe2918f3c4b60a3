"""Box helpers shared by the dynamic-k matcher and the set criterion.

Shape legend: P matched (prediction, ground-truth) pairs, N proposals, G ground-truth boxes.
All boxes are absolute xyxy (pixel x1, y1, x2, y2) unless a name says otherwise.

The official code computes GIoU with a helper that asserts ``x2 >= x1`` and ``y2 >= y1``, so a
single inverted predicted box aborts training (official issue #60). Here predicted boxes are
passed through :func:`order_box_corners` before any IoU/GIoU, and the GIoU loss uses torchvision's
eps-guarded ``generalized_box_iou_loss``, so inverted or zero-area predictions give finite values
and gradients. For well-formed boxes both changes are exact no-ops (up to the 1e-7 eps).
"""
import torch
from torchvision.ops import generalized_box_iou_loss


def order_box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Swap corners where needed so that ``x1 <= x2`` and ``y1 <= y2``.

    Args:
        boxes: (..., 4) abs xyxy boxes, possibly inverted (x2 < x1 or y2 < y1).

    Returns:
        (..., 4) abs xyxy boxes spanning the same region with ordered corners. Differentiable
        (min/max route the gradient to whichever corner ends up on each side).
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    low_x, high_x = torch.minimum(x1, x2), torch.maximum(x1, x2)
    low_y, high_y = torch.minimum(y1, y2), torch.maximum(y1, y2)
    return torch.stack((low_x, low_y, high_x, high_y), dim=-1)


def giou_loss_sum(pred_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """Sum over pairs of ``1 - GIoU(pred, target)``, robust to degenerate predictions.

    Args:
        pred_boxes: (P, 4) abs xyxy predictions (may be inverted or have zero area).
        target_boxes: (P, 4) abs xyxy ground truth, paired row by row with ``pred_boxes``.

    Returns:
        Scalar tensor: the summed loss (0 for P = 0), graph-connected to ``pred_boxes``.
    """
    return generalized_box_iou_loss(order_box_corners(pred_boxes), target_boxes, reduction="sum")


def normalized_l1_sum(
    pred_boxes: torch.Tensor, target_boxes: torch.Tensor, image_sizes_xyxy: torch.Tensor
) -> torch.Tensor:
    """Sum over pairs and coordinates of ``|pred / size - target / size|`` (official L1 term).

    Args:
        pred_boxes: (P, 4) abs xyxy predictions.
        target_boxes: (P, 4) abs xyxy ground truth, paired row by row with ``pred_boxes``.
        image_sizes_xyxy: (P, 4) ``(w, h, w, h)`` of the un-padded image each pair belongs to.

    Returns:
        Scalar tensor (0 for P = 0).
    """
    return (pred_boxes / image_sizes_xyxy - target_boxes / image_sizes_xyxy).abs().sum()
