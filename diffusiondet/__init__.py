"""DiffusionDet on detectron2: object detection as denoising diffusion over boxes.

Importing the package (or any of its modules, e.g. ``diffusiondet.config``) imports only the
config code. The model, data and training code load when first used: ``diffusiondet.DiffusionDet``
or ``diffusiondet.modeling`` imports the model, and ``build_config`` and the engine's ``Trainer``
register the meta-architecture, backbones and datasets a config names (see
``diffusiondet.config_extensions``).
"""
import importlib

from .config import add_diffusiondet_config, build_config, validate_diffusiondet_config
from .config_extensions import ConfigExtension, register_config_extension

__all__ = [
    "ConfigExtension",
    "DiffusionDet",
    "add_diffusiondet_config",
    "build_config",
    "register_config_extension",
    "validate_diffusiondet_config",
]

# Public names that live in the heavy subpackages -> the subpackage that defines them.
_LAZY_ATTRIBUTES = {"DiffusionDet": "modeling"}
# Subpackages reachable as attributes after a bare ``import diffusiondet``, as when this file
# imported them eagerly.
_LAZY_SUBPACKAGES = ("data", "diffusion", "engine", "evaluation", "modeling", "utils")


def __getattr__(name):
    # PEP 562: only called for names not found above, so each import happens on first use.
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_LAZY_SUBPACKAGES))
