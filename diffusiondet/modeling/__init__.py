"""DiffusionDet model parts: head, matcher, criterion, sampler and meta-architecture."""
from . import backbone  # registers the Swin-FPN and timm-FPN backbone builders
from .criterion import SetCriterion
from .head import DynamicHead
from .matcher import DynamicKMatcher
from .meta_arch import DiffusionDet  # registers the meta-architecture
from .sampler import DDIMBoxSampler

__all__ = ["DDIMBoxSampler", "DiffusionDet", "DynamicHead", "DynamicKMatcher", "SetCriterion"]
