"""DiffusionEngine model parts: the frozen Stable Diffusion backbone and its channel mapper."""
# Importing the backbone module registers build_stable_diffusion_backbone in detectron2's
# BACKBONE_REGISTRY (MODEL.BACKBONE.NAME of configs/Base-DiffusionEngine.yaml).
from .backbone import StableDiffusionBackbone, build_stable_diffusion_backbone

__all__ = ["StableDiffusionBackbone", "build_stable_diffusion_backbone"]
