"""The DiffusionInst meta-architecture: DiffusionDet whose proposals also carry mask filters.

Only boxes are diffused; each proposal's filter is predicted from its stage's regression feature
and applied to a shared mask feature map by a small dynamic head, as the official implementation
does (the DiffusionInst paper, arXiv 2212.02773, describes noisy filters instead). Everything else
(training corruption, DDIM sampling, renewal, ensemble, NMS) is DiffusionDet's, reached through
its extension points.

Shape legend: B images, G GT objects of an image, M detections of an image, P filter length,
C × h × w the mask feature map at stride s. Boxes are abs xyxy in the network input image.
"""
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import BitMasks, Instances, PolygonMasks

from diffusiondet.modeling import DiffusionDet
from diffusiondet.modeling import builders
from diffusiondet.modeling.inference import ImageContext

from .criterion import MaskSetCriterion
from .dynamic_mask_head import DynamicMaskHeadSpec, dynamic_mask_logits
from .head import DiffusionInstHead
from .mask_postprocess import masks_to_image

__all__ = ["DiffusionInst"]


def mask_head_spec_from_config(cfg) -> DynamicMaskHeadSpec:
    m = cfg.MODEL.DiffusionInst
    return DynamicMaskHeadSpec(
        in_channels=m.MASK_FEAT_CHANNELS,
        channels=tuple(m.MASK_HEAD_CHANNELS),
        rel_coords=m.MASK_REL_COORDS,
    )


@META_ARCH_REGISTRY.register()
class DiffusionInst(DiffusionDet):
    """DiffusionInst (Gu et al., 2022): instance segmentation with diffused boxes and dynamic
    mask filters. Outputs ``pred_masks`` (M, H, W) bool beside DiffusionDet's fields."""

    sampled_outputs = DiffusionDet.sampled_outputs + ("pred_kernels",)

    @configurable
    def __init__(
        self,
        *,
        mask_threshold: float = 0.5,
        clip_masks_to_boxes: bool = True,
        **kwargs,
    ):
        """
        Args:
            mask_threshold: probability above which a mask pixel is foreground (official 0.5).
            clip_masks_to_boxes: zero each mask outside its box (official post-processing).
            **kwargs: :class:`DiffusionDet` arguments; ``head`` must be a
                :class:`DiffusionInstHead`.
        """
        super().__init__(**kwargs)
        if not isinstance(self.head, DiffusionInstHead):
            raise TypeError(f"DiffusionInst needs a DiffusionInstHead, got {type(self.head).__name__}")
        self.mask_threshold = mask_threshold
        self.clip_masks_to_boxes = clip_masks_to_boxes

    @classmethod
    def from_config(cls, cfg):
        m = cfg.MODEL.DiffusionInst
        return {
            **super().from_config(cfg),
            "mask_threshold": m.MASK_THRESHOLD,
            "clip_masks_to_boxes": m.CLIP_MASKS_TO_BOXES,
        }

    @classmethod
    def build_head(cls, cfg, input_shapes) -> DiffusionInstHead:
        m = cfg.MODEL.DiffusionInst
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        indices = [in_features.index(name) for name in m.MASK_IN_FEATURES]
        return DiffusionInstHead(
            **builders.head_kwargs(cfg, input_shapes),
            mask_in_indices=indices,
            mask_strides=[input_shapes[i].stride for i in indices],
            mask_branch_channels=m.MASK_BRANCH_CHANNELS,
            mask_num_convs=m.MASK_NUM_CONVS,
            mask_head_spec=mask_head_spec_from_config(cfg),
            mask_norm=m.MASK_NORM,
        )

    @classmethod
    def build_criterion(cls, cfg, head: DiffusionInstHead) -> MaskSetCriterion:
        m = cfg.MODEL.DiffusionInst
        return MaskSetCriterion(
            **builders.criterion_kwargs(cfg),
            mask_head_spec=head.mask_head_spec,
            mask_stride=head.mask_stride,
            mask_weight=m.MASK_WEIGHT,
            dice_eps=m.DICE_EPS,
            mask_target=m.MASK_TARGET,
        )

    # ---------------------------------------------------------------- training
    def build_targets(self, batched_inputs: List[Dict], whwh: torch.Tensor) -> List[Dict]:
        """DiffusionDet's targets plus ``masks``: (G, H, W) bool at the un-padded image size."""
        targets = super().build_targets(batched_inputs, whwh)
        for target, x, size in zip(targets, batched_inputs, whwh):
            inst: Instances = x["instances"]
            height, width = int(size[1]), int(size[0])
            if not inst.has("gt_masks"):
                raise ValueError(
                    "DiffusionInst trains on instance masks: the mapper gave none (MODEL.MASK_ON "
                    "must be True and the dataset must have 'segmentation')"
                )
            masks = inst.gt_masks
            if isinstance(masks, PolygonMasks):
                masks = BitMasks.from_polygon_masks(masks, height, width)
            target["masks"] = masks.tensor.to(self.device, dtype=torch.bool)  # (G, H, W)
        return targets

    # --------------------------------------------------------------- inference
    def build_instances(self, det: Dict[str, torch.Tensor], ctx: ImageContext) -> Instances:
        """DiffusionDet's fields plus ``pred_mask_probs`` (M, h, w): each detection's filter
        run on its image's mask feature, sigmoid, over the padded image at the mask stride."""
        inst = super().build_instances(det, ctx)
        mask_feat = ctx.per_image["mask_feat"]  # (C, h, w)
        kernels = det["pred_kernels"]  # (M, P)
        image_index = torch.zeros(kernels.shape[0], dtype=torch.long, device=kernels.device)
        logits = dynamic_mask_logits(
            mask_feat[None].float(), kernels.float(), image_index, self.head.mask_head_spec,
            det["boxes"].float(), self.head.mask_stride,
        )
        inst.pred_mask_probs = logits.sigmoid()
        return inst

    def finish_instances(self, inst: Instances, ctx: ImageContext, frame_size) -> Instances:
        """Masks upsampled to the input, cropped to the un-padded image, resized to the final
        ``frame_size``, thresholded and (officially) clipped to their final boxes."""
        probs = inst.pred_mask_probs
        inst.remove("pred_mask_probs")
        boxes = inst.pred_boxes.tensor if self.clip_masks_to_boxes else None
        inst.pred_masks = masks_to_image(
            probs, self.head.mask_stride, ctx.image_size, tuple(frame_size), boxes,
            self.mask_threshold,
        )
        return inst
