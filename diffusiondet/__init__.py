"""DiffusionDet on detectron2: object detection as denoising diffusion over boxes."""
from . import data  # noqa: F401  registers the built-in datasets (synthetic_crowd_*)
from .config import add_diffusiondet_config, validate_diffusiondet_config
from .modeling import DiffusionDet  # registers the meta-architecture

__all__ = ["DiffusionDet", "add_diffusiondet_config", "validate_diffusiondet_config"]
