"""Command line of tools/train_net.py, tools/demo.py and tools/benchmark.py.

``build_config`` and ``shorthand_opts`` moved down to ``diffusiondet.config`` (so that a package
built on DiffusionDet can build configs without the training code) and ``register_custom_datasets``
to ``diffusiondet.data.datasets.custom``; they stay importable from here for existing callers.
"""
from detectron2.engine import default_argument_parser

from ..config import build_config, shorthand_opts
from ..data.datasets.custom import register_custom_datasets

__all__ = ["argument_parser", "build_config", "register_custom_datasets", "shorthand_opts"]


def argument_parser(epilog=None):
    """detectron2's standard arguments plus ``--steps``, ``--boxes`` and ``--dist-timeout``."""
    parser = default_argument_parser(epilog)
    parser.add_argument(
        "--steps", type=int, default=None,
        help="DDIM sampling steps at inference (MODEL.DiffusionDet.SAMPLE_STEP)",
    )
    parser.add_argument(
        "--boxes", type=int, default=None,
        help="number of boxes at inference (MODEL.DiffusionDet.EVAL_NUM_PROPOSALS)",
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=30.0, metavar="MINUTES",
        help="multi-process runs: minutes a process waits in a collective (all-reduce, barrier) for"
        " the others before the job fails (detectron2's default: 30). A rank that dies on this"
        " machine ends the job at once; a stuck rank, or one lost on another machine, ends it"
        " after this long instead of hanging",
    )
    return parser
