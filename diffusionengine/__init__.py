"""DiffusionEngine (arXiv 2309.03893) on detectron2: a frozen Stable Diffusion U-Net's features
with our DiffusionDet as the detection adapter, and the data engine built on it.

Importing the package registers the ``diffusionengine`` config extension and nothing heavier:
diffusers, transformers and the model load on first use of the names below, or when
``build_config`` (this package's, or ``diffusiondet.config``'s with
``extensions=("diffusionengine",)``) registers the ``build_stable_diffusion_backbone`` backbone.
"""
import importlib

from .config import add_diffusionengine_config, build_config, validate_diffusionengine_config

__all__ = [
    "SDComponents",
    "StableDiffusionBackbone",
    "UNetTaps",
    "add_diffusionengine_config",
    "build_config",
    "build_tiny_sd_folder",
    "load_local_sd",
    "tap_channels",
    "tiny_sd_components",
    "validate_diffusionengine_config",
]

# PEP 562: name -> module that defines it, imported on first use, not with the package.
_LAZY = {
    "StableDiffusionBackbone": ".modeling",
    "SDComponents": ".local_sd",
    "load_local_sd": ".local_sd",
    "UNetTaps": ".taps",
    "tap_channels": ".taps",
    "tiny_sd_components": ".tiny_sd",
    "build_tiny_sd_folder": ".tiny_sd",
}


def __getattr__(name):
    if name == "modeling":
        return importlib.import_module(".modeling", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
