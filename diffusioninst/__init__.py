"""DiffusionInst on detectron2: DiffusionDet whose proposals also predict dynamic mask filters.

Importing the package registers the ``diffusioninst`` config extension and nothing heavier; the
model loads on first use of ``diffusioninst.DiffusionInst`` / ``diffusioninst.modeling``, or when
``build_config`` (this package's or ``diffusiondet.config``'s with ``extensions=("diffusioninst",)``)
registers the DiffusionInst meta-architecture.
"""
import importlib

from .config import add_diffusioninst_config, build_config, validate_diffusioninst_config

__all__ = [
    "DiffusionInst",
    "add_diffusioninst_config",
    "build_config",
    "validate_diffusioninst_config",
]


def __getattr__(name):
    # PEP 562: the model is imported on first use, not with the package.
    if name == "DiffusionInst":
        return importlib.import_module(".modeling", __name__).DiffusionInst
    if name == "modeling":
        return importlib.import_module(".modeling", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
