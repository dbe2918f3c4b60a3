"""Training / evaluation glue (the only package besides config code that reads a cfg)."""
from .optimizer import build_optimizer
from .setup import argument_parser, build_config, shorthand_opts
from .trainer import Trainer

__all__ = ["Trainer", "argument_parser", "build_config", "build_optimizer", "shorthand_opts"]
