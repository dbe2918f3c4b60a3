"""Training / evaluation glue (the only package besides config code that reads a cfg)."""
from .checkpoint import CheckpointError, DiffusionDetCheckpointer
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
    "shorthand_opts",
]
