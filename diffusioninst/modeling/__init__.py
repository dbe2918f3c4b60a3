"""DiffusionInst model parts: mask-filter head, mask branch, dynamic mask head, dice criterion."""
from .criterion import MaskSetCriterion
from .dynamic_mask_head import DynamicMaskHeadSpec, dynamic_mask_logits, split_mask_params
from .head import DiffusionInstHead, MaskFilterStage
from .meta_arch import DiffusionInst  # registers the meta-architecture

__all__ = [
    "DiffusionInst",
    "DiffusionInstHead",
    "DynamicMaskHeadSpec",
    "MaskFilterStage",
    "MaskSetCriterion",
    "dynamic_mask_logits",
    "split_mask_params",
]
