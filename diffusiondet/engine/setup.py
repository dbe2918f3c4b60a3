"""Command-line -> frozen config, shared by tools/train_net.py, tools/demo.py and tools/benchmark.py."""
import logging

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser

from ..config import add_diffusiondet_config, validate_diffusiondet_config
from ..data.datasets import register_coco_json, validate_coco_json

logger = logging.getLogger(__name__)


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


def shorthand_opts(steps=None, boxes=None):
    """Translate --steps/--boxes into config overrides (validated with the rest of the config)."""
    opts = []
    if boxes is not None and boxes < 1:
        # 0 is the config's "same as NUM_PROPOSALS"; on the command line it is a mistake.
        raise ValueError(f"--boxes (MODEL.DiffusionDet.EVAL_NUM_PROPOSALS) must be >= 1, got {boxes}")
    if steps is not None:
        opts += ["MODEL.DiffusionDet.SAMPLE_STEP", steps]
    if boxes is not None:
        opts += ["MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", boxes]
    return opts


def register_custom_datasets(cfg):
    """Register DATASETS.CUSTOM.* jsons as custom_train / custom_test and point the config at them.

    NUM_CLASSES follows the training json's categories, so no Python is needed for own data.
    """
    custom = cfg.DATASETS.CUSTOM
    if custom.TRAIN_JSON:
        num_classes = validate_coco_json(custom.TRAIN_JSON, custom.TRAIN_IMAGES)
        register_coco_json("custom_train", custom.TRAIN_JSON, custom.TRAIN_IMAGES)
        cfg.DATASETS.TRAIN = ("custom_train",)
        if cfg.MODEL.DiffusionDet.NUM_CLASSES != num_classes:
            logger.info(
                "MODEL.DiffusionDet.NUM_CLASSES set to %d from %s", num_classes, custom.TRAIN_JSON
            )
            cfg.MODEL.DiffusionDet.NUM_CLASSES = num_classes
    if custom.TEST_JSON:
        num_test = validate_coco_json(custom.TEST_JSON, custom.TEST_IMAGES)
        register_coco_json("custom_test", custom.TEST_JSON, custom.TEST_IMAGES)
        cfg.DATASETS.TEST = ("custom_test",)
        if custom.TRAIN_JSON and num_test != cfg.MODEL.DiffusionDet.NUM_CLASSES:
            raise ValueError(
                f"{custom.TEST_JSON} has {num_test} categories but {custom.TRAIN_JSON} has "
                f"{cfg.MODEL.DiffusionDet.NUM_CLASSES}"
            )


def _check_override_keys(cfg, opts):
    """yacs reports an unknown command-line key with an ``assert`` (gone under ``python -O``);
    raise the KeyError that an unknown key in a YAML file gets instead."""
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs; got an odd number: {list(opts)}")
    for key in opts[0::2]:
        node = cfg
        for part in str(key).split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise KeyError(f"Non-existent config key: {key}")
            node = node[part]


def build_config(config_file="", opts=(), steps=None, boxes=None, extensions=()):
    """Build and validate a (not yet frozen) config; registers DATASETS.CUSTOM data.

    Args:
        extensions: ``(add_fn, validate_fn)`` pairs of detectors built on DiffusionDet (e.g.
            DiffusionInst's): ``add_fn(cfg)`` runs after ``add_diffusiondet_config``,
            ``validate_fn(cfg)`` after ``validate_diffusiondet_config``.
    """
    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    for add_fn, _ in extensions:
        add_fn(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    opts = list(opts) + shorthand_opts(steps, boxes)
    _check_override_keys(cfg, opts)
    cfg.merge_from_list(opts)
    validate_diffusiondet_config(cfg)
    for _, validate_fn in extensions:
        validate_fn(cfg)
    register_custom_datasets(cfg)
    return cfg
