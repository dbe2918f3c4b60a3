"""Backbones beyond detectron2's ResNet-FPN, registered in detectron2's BACKBONE_REGISTRY."""
from . import swin_fpn  # noqa: F401  registers build_swintransformer_fpn_backbone
from . import timm_fpn  # noqa: F401  (registers build_timm_fpn_backbone)
