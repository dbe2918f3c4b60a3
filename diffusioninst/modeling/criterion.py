"""DiffusionInst's criterion: DiffusionDet's losses plus a dice mask loss at every scored stage.

Shape legend: B images, N proposals, P filter length, C × h × w the mask feature map (stride s),
G ground-truth objects of one image, M matched (query, GT) pairs of the batch.
"""
from typing import Dict, List

import torch

from diffusiondet.modeling.criterion import PER_IMAGE, Match, SetCriterion

from .dynamic_mask_head import DynamicMaskHeadSpec, dynamic_mask_logits
from .mask_losses import MASK_TARGET_MODES, dice_loss_per_mask, masks_at_stride

__all__ = ["MaskSetCriterion"]


class MaskSetCriterion(SetCriterion):
    """:class:`SetCriterion` plus ``loss_masks`` (dice).

    Each stage's queries are matched by the box matcher of that stage (no mask cost), and every
    positive query's own filter of that stage is run on its image's mask feature and compared
    with its GT mask sub-sampled to the mask stride (dice loss as in the DiffusionInst paper,
    arXiv 2212.02773; every stage scored, as the official implementation does). Key names follow
    the official ones: ``loss_masks`` and ``loss_masks_{i}`` for auxiliary stages.
    """

    def __init__(
        self,
        *,
        mask_head_spec: DynamicMaskHeadSpec = DynamicMaskHeadSpec(),
        mask_stride: int = 4,
        mask_weight: float = 5.0,
        dice_eps: float = 1e-5,
        mask_target: str = "center",
        **kwargs,
    ):
        """
        Args:
            mask_head_spec: layout of the dynamic mask head the filters parameterise.
            mask_stride: s, stride of the mask feature map in input pixels.
            mask_weight: weight of ``loss_masks`` (official 5).
            dice_eps: smoothing term of the dice denominator (official 1e-5).
            mask_target: how GT masks become stride-s targets, see :func:`masks_at_stride`
                (official "center").
            **kwargs: :class:`SetCriterion` arguments.
        """
        super().__init__(**kwargs)
        self.mask_head_spec = mask_head_spec
        self.mask_stride = int(mask_stride)
        self.dice_eps = dice_eps
        if mask_target not in MASK_TARGET_MODES:
            raise ValueError(f"mask_target must be one of {MASK_TARGET_MODES}, got {mask_target!r}")
        self.mask_target = mask_target
        self.weight_dict["loss_masks"] = mask_weight

    def get_loss_functions(self):
        fns = super().get_loss_functions()
        fns["masks"] = self.loss_masks
        return fns

    def forward(self, outputs: Dict, targets: List[Dict], per_image=None):
        """As :meth:`SetCriterion.forward`; ``outputs`` also holds ``pred_kernels``
        (S, B, N, P), ``per_image`` holds ``mask_feat`` (B, C, h, w) and each target
        ``masks`` (G, H, W) bool at its un-padded image size."""
        if per_image is None or "mask_feat" not in per_image:
            raise ValueError("MaskSetCriterion needs per_image['mask_feat'] (B, C, h, w)")
        size = tuple(per_image["mask_feat"].shape[-2:])
        # Sub-sampled once per step, shared by all stages.
        targets = [
            {**t, "masks_at_stride": masks_at_stride(t["masks"], size, self.mask_stride, self.mask_target)}
            for t in targets
        ]
        return super().forward(outputs, targets, per_image)

    def loss_masks(
        self, outputs: Dict, targets: List[Dict], matches: List[Match], num_pos: float
    ) -> Dict[str, torch.Tensor]:
        """Dice loss of one stage, summed over the M positive queries and divided by
        ``num_pos`` (= M, at least 1); a graph-connected 0 when M = 0.

        Args:
            outputs: ``pred_kernels`` (B, N, P) of one stage and ``per_image["mask_feat"]``.
            targets / matches: targets (with ``masks_at_stride`` (G, h, w)) and this stage's
                per-image matches.
            num_pos: number of positive queries in the batch (>= 1).
        """
        kernels = outputs["pred_kernels"]  # (B, N, P)
        pred_boxes = outputs["pred_boxes"]  # (B, N, 4) abs xyxy
        mask_feat = outputs[PER_IMAGE]["mask_feat"]  # (B, C, h, w)
        params, boxes, image_index, gt_masks = [], [], [], []
        for b, ((fg_mask, gt_index), target) in enumerate(zip(matches, targets)):
            params.append(kernels[b][fg_mask])
            boxes.append(pred_boxes[b][fg_mask])
            image_index.append(torch.full((len(gt_index),), b, dtype=torch.long))
            gt_masks.append(target["masks_at_stride"][gt_index])
        params = torch.cat(params)  # (M, P)
        if params.shape[0] == 0:
            # Keeps filters and mask branch in the graph (DDP unused parameters).
            return {"loss_masks": kernels.sum() * 0.0 + mask_feat.sum() * 0.0}
        # The positives' own predicted boxes place the relative coordinates, as at inference.
        logits = dynamic_mask_logits(
            mask_feat, params, torch.cat(image_index).to(mask_feat.device), self.mask_head_spec,
            torch.cat(boxes), self.mask_stride,
        )  # (M, h, w)
        targets_at_stride = torch.cat(gt_masks).to(logits)
        dice = dice_loss_per_mask(logits, targets_at_stride, self.dice_eps)  # (M,)
        return {"loss_masks": dice.sum() / num_pos}
