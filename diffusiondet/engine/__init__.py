"""Training / evaluation glue (the only package besides config code that reads a cfg)."""
# The Trainer builds models through detectron2's registry, by the name in the config: the
# DiffusionDet meta-architecture and the Swin/timm backbones must be registered even when the
# config did not come from build_config.
from .. import modeling  # noqa: F401
from .checkpoint import CheckpointError, DiffusionDetCheckpointer, load_model_weights
from .optimizer import build_optimizer
from .setup import argument_parser, build_config, shorthand_opts
from .train_loop import SkipNonFiniteTrainer
from .trainer import Trainer

__all__ = [
    "CheckpointError",
    "DiffusionDetCheckpointer",
    "SkipNonFiniteTrainer",
    "Trainer",
    "argument_parser",
    "build_config",
    "build_optimizer",
    "load_model_weights",
    "shorthand_opts",
]
