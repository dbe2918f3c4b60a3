"""Config keys of DiffusionEngine (arXiv 2309.03893), on top of DiffusionDet's.

``MODEL.DiffusionEngine`` holds the frozen Stable Diffusion backbone's keys and the labelling
rules of the data engine; ``DATASETS.GENERATED`` the generated training sets. The detector
keys stay under ``MODEL.DiffusionDet``: the adapter is our DiffusionDet.

Importing this module registers the ``diffusionengine`` config extension (see
``diffusiondet.config_extensions``); the backbone and the generated-set registration are named
there, not imported. Nothing here imports diffusers or transformers: the checks that need the
model's layout read the folder's ``config.json`` files when they exist.
"""
import json
import os

from detectron2.config import CfgNode as CN

from diffusioninst.config import build_config as build_diffusioninst_config
from diffusiondet.config_extensions import register_config_extension

from .taps import feature_strides

__all__ = [
    "BACKBONE_NAME",
    "add_diffusionengine_config",
    "backbone_feature_strides",
    "build_config",
    "validate_diffusionengine_config",
]

# MODEL.BACKBONE.NAME of the frozen-SD backbone (diffusionengine.modeling.backbone).
BACKBONE_NAME = "build_stable_diffusion_backbone"
# SD's VAE takes RGB in [-1, 1]: (x - 127.5) / 127.5 of 0..255 pixels.
SD_PIXEL_MEAN = [127.5, 127.5, 127.5]
SD_PIXEL_STD = [127.5, 127.5, 127.5]
# The layout of SD 1.x / 2.x when the folder cannot be read: 4 U-Net levels, a /8 VAE.
_SD_UNET_CONFIG = {"block_out_channels": (320, 640, 1280, 1280)}
_SD_VAE_SCALE_FACTOR = 8


def add_diffusionengine_config(cfg):
    """Add the ``MODEL.DiffusionEngine`` and ``DATASETS.GENERATED`` keys."""
    cfg.MODEL.DiffusionEngine = CN()
    e = cfg.MODEL.DiffusionEngine
    # Local diffusers folder of an SD 1.x / 2.x model (see diffusionengine/local_sd.py); the
    # paper's backbone is SD v2. Never a hub id: nothing is downloaded.
    e.SD_PATH = ""
    # Timestep t of the one noising step before the feature pass (paper: one step at t = 1,
    # the last step of SD's 50-step "leading" DDIM schedule).
    e.TIMESTEP = 1
    # Prompt of the feature pass, encoded once at build time (paper Eq. 4: empty by default).
    e.PROMPT = ""
    # 3x3 stride-2 conv levels added after the coarsest tap level (the paper's ChannelMapper
    # adds one: 5 levels p3..p7 for SD).
    e.EXTRA_LEVELS = 1
    # Data engine: a predicted box labels a generated image when its score exceeds this (the
    # paper's delta = 0.3, "Data scaling-up").
    e.LABEL_SCORE_THRESH = 0.3
    # Data engine: IoU of the class-wise NMS on those boxes (duplicates would be written twice).
    e.LABEL_NMS_THRESH = 0.5
    # Data engine: boxes smaller than this (pixels, either side) are dropped as degenerate.
    e.LABEL_MIN_SIZE = 2.0
    # Data engine: at most this many boxes per generated image, by score.
    e.LABEL_MAX_PER_IMAGE = 100
    # Data engine: class names that may label a generated image; empty = every class.
    e.LABEL_CLASSES = ()

    cfg.DATASETS.GENERATED = CN()
    # Folders written by tools/generate_dataset.py (each: annotations.json + images/), added to
    # DATASETS.TRAIN: the paper trains on the real set plus the generated one.
    cfg.DATASETS.GENERATED.DIRS = ()
    # Repeat factor of every generated set (detectron2's WeightedTrainingSampler through
    # DATASETS.TRAIN_REPEAT_FACTOR): < 1 samples generated images less often than real ones.
    cfg.DATASETS.GENERATED.REPEAT_FACTOR = 1.0


def _read_json(path: str):
    """The json at ``path``, or None when it does not exist or cannot be read (the loader
    reports a bad folder with the full expected layout)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def backbone_feature_strides(sd_path: str, extra_levels: int) -> dict:
    """Output name -> stride of the SD backbone for the folder ``sd_path`` (SD's layout when
    the folder's configs cannot be read)."""
    unet = _read_json(os.path.join(sd_path, "unet", "config.json")) if sd_path else None
    vae = _read_json(os.path.join(sd_path, "vae", "config.json")) if sd_path else None
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1) if vae else _SD_VAE_SCALE_FACTOR
    return feature_strides(unet or _SD_UNET_CONFIG, vae_scale, max(extra_levels, 0))


def _num_train_timesteps(sd_path: str):
    config = _read_json(os.path.join(sd_path, "scheduler", "scheduler_config.json")) if sd_path else None
    return config.get("num_train_timesteps") if config else None


def validate_diffusionengine_config(cfg):
    """Raise a clear ``ValueError`` listing every DiffusionEngine value that would fail later."""
    e = cfg.MODEL.DiffusionEngine
    steps = _num_train_timesteps(e.SD_PATH)
    checks = [
        (
            e.TIMESTEP >= 0 and (steps is None or e.TIMESTEP < steps),
            f"MODEL.DiffusionEngine.TIMESTEP must be in [0, {steps - 1 if steps else 'num_train_timesteps - 1'}]"
            f" (the scheduler of SD_PATH), got {e.TIMESTEP}",
        ),
        (e.EXTRA_LEVELS >= 0, f"MODEL.DiffusionEngine.EXTRA_LEVELS must be >= 0, got {e.EXTRA_LEVELS}"),
        (
            0.0 <= e.LABEL_SCORE_THRESH <= 1.0,
            f"MODEL.DiffusionEngine.LABEL_SCORE_THRESH must be in [0, 1], got {e.LABEL_SCORE_THRESH}",
        ),
        (
            0.0 <= e.LABEL_NMS_THRESH <= 1.0,
            f"MODEL.DiffusionEngine.LABEL_NMS_THRESH must be in [0, 1], got {e.LABEL_NMS_THRESH}",
        ),
        (e.LABEL_MIN_SIZE >= 0, f"MODEL.DiffusionEngine.LABEL_MIN_SIZE must be >= 0, got {e.LABEL_MIN_SIZE}"),
        (
            e.LABEL_MAX_PER_IMAGE >= 1,
            f"MODEL.DiffusionEngine.LABEL_MAX_PER_IMAGE must be >= 1, got {e.LABEL_MAX_PER_IMAGE}",
        ),
        (
            all(isinstance(c, str) and c for c in e.LABEL_CLASSES),
            f"MODEL.DiffusionEngine.LABEL_CLASSES must be class names, got {tuple(e.LABEL_CLASSES)}",
        ),
        (
            cfg.DATASETS.GENERATED.REPEAT_FACTOR > 0,
            f"DATASETS.GENERATED.REPEAT_FACTOR must be > 0, got {cfg.DATASETS.GENERATED.REPEAT_FACTOR}",
        ),
    ]
    if cfg.MODEL.BACKBONE.NAME == BACKBONE_NAME:
        checks += _backbone_checks(cfg)
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ValueError("Invalid DiffusionEngine config:\n  " + "\n  ".join(errors))


def _backbone_checks(cfg):
    """What the SD backbone needs of the rest of the config."""
    e, out_channels = cfg.MODEL.DiffusionEngine, cfg.MODEL.FPN.OUT_CHANNELS
    outputs = backbone_feature_strides(e.SD_PATH, e.EXTRA_LEVELS)
    in_features = tuple(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    return [
        (bool(e.SD_PATH), f"MODEL.DiffusionEngine.SD_PATH must name a local SD folder with {BACKBONE_NAME}"),
        (
            cfg.INPUT.FORMAT == "RGB",
            f"INPUT.FORMAT must be 'RGB' with {BACKBONE_NAME} (SD's VAE reads RGB), got {cfg.INPUT.FORMAT!r}",
        ),
        (
            list(cfg.MODEL.PIXEL_MEAN) == SD_PIXEL_MEAN and list(cfg.MODEL.PIXEL_STD) == SD_PIXEL_STD,
            f"MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must be {SD_PIXEL_MEAN} with {BACKBONE_NAME} (SD's VAE"
            f" takes [-1, 1]), got {list(cfg.MODEL.PIXEL_MEAN)} and {list(cfg.MODEL.PIXEL_STD)}",
        ),
        (
            cfg.MODEL.DiffusionDet.HIDDEN_DIM == out_channels,
            f"MODEL.DiffusionDet.HIDDEN_DIM ({cfg.MODEL.DiffusionDet.HIDDEN_DIM}) must equal"
            f" MODEL.FPN.OUT_CHANNELS ({out_channels}), the channel mapper's width",
        ),
        (
            out_channels >= 32 and out_channels % 32 == 0,
            f"MODEL.FPN.OUT_CHANNELS must be a multiple of 32 with {BACKBONE_NAME} (GroupNorm(32) in the"
            f" channel mapper), got {out_channels}",
        ),
        (
            len(in_features) >= 1 and set(in_features) <= set(outputs),
            f"MODEL.ROI_HEADS.IN_FEATURES {in_features} must be among the backbone's outputs"
            f" {tuple(outputs)}",
        ),
    ]


# build_model looks the backbone up by MODEL.BACKBONE.NAME: importing the modeling package
# registers it. The generated sets are registered (and added to DATASETS.TRAIN) last.
register_config_extension(
    "diffusionengine",
    add_config=add_diffusionengine_config,
    validate=validate_diffusionengine_config,
    registers=("diffusionengine.modeling",),
    prepare="diffusionengine.data.generated:register_generated_sets",
)


def build_config(config_file="", opts=(), steps=None, boxes=None, extensions=(), trust_config=None):
    """``diffusioninst.build_config`` with the DiffusionEngine extension: builds DiffusionDet,
    DiffusionInst and DiffusionEngine configs alike (each ignores the others' keys), so the tools
    take any config of the project.

    ``extensions`` names further extensions, applied after DiffusionEngine's; the other
    arguments as in ``diffusiondet.config.build_config``.
    """
    return build_diffusioninst_config(
        config_file,
        opts,
        steps=steps,
        boxes=boxes,
        extensions=("diffusionengine", *extensions),
        trust_config=trust_config,
    )
