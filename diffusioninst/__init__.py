"""DiffusionInst on detectron2: DiffusionDet whose proposals also predict dynamic mask filters."""
from .config import add_diffusioninst_config, build_config, validate_diffusioninst_config
from .modeling import DiffusionInst  # registers the meta-architecture

__all__ = [
    "DiffusionInst",
    "add_diffusioninst_config",
    "build_config",
    "validate_diffusioninst_config",
]
