"""Config keys of DiffusionInst, on top of DiffusionDet's.

The detector keys (proposals, head, matching, diffusion, sampling) stay under
``MODEL.DiffusionDet``: DiffusionInst is DiffusionDet plus masks. ``MODEL.DiffusionInst`` holds
the mask keys; each default is the constant the official DiffusionInst code hard-codes.

Importing this module registers the ``diffusioninst`` config extension (see
``diffusiondet.config_extensions``); the model code is named there, not imported.
"""
from detectron2.config import CfgNode as CN

from diffusiondet.config import build_config as build_diffusiondet_config
from diffusiondet.config_extensions import register_config_extension

__all__ = ["add_diffusioninst_config", "validate_diffusioninst_config", "build_config"]


def add_diffusioninst_config(cfg):
    """Add the ``MODEL.DiffusionInst`` mask keys (call after ``add_diffusiondet_config``)."""
    cfg.MODEL.DiffusionInst = CN()
    m = cfg.MODEL.DiffusionInst
    # Backbone levels that build the shared mask feature, finest first; they must be pooled
    # levels (ROI_HEADS.IN_FEATURES) and the first one sets the mask stride (official: p2..p4,
    # so stride 4; the paper's "P3-P5" is not what the code does).
    m.MASK_IN_FEATURES = ("p2", "p3", "p4")
    # Width of the per-level refine convs and of the mask tower.
    m.MASK_BRANCH_CHANNELS = 128
    # 3x3 conv-norm-ReLU blocks of the mask tower after the levels are summed.
    m.MASK_NUM_CONVS = 4
    # Channels of the shared mask feature map (the input of the dynamic mask head).
    m.MASK_FEAT_CHANNELS = 8
    # Output channels of each 1x1 layer of the dynamic mask head; the last must be 1. Together
    # with MASK_FEAT_CHANNELS this sets the filter length each proposal predicts
    # (official 8-8-1 on 8 channels: 153 values).
    m.MASK_HEAD_CHANNELS = (8, 8, 1)
    # Append CondInst's 2 relative coordinates (offset from the instance's box centre, in box
    # sizes) to the dynamic head's input. Off in the official implementation (its filters see
    # only the features, so alike objects get alike masks); on in the synthetic CPU recipe.
    # Changes the filter length, so official checkpoints need it off (docs/diffusioninst_recipe.md).
    m.MASK_REL_COORDS = False
    # Normalisation of the mask branch convs: "BN" (official, plain BatchNorm), "SyncBN", "GN",
    # "" (none; the convs then get a bias, which changes the checkpoint layout).
    m.MASK_NORM = "BN"
    # Weight of the dice loss at every scored stage (official 5, applied inside its loss).
    m.MASK_WEIGHT = 5.0
    # How a GT mask becomes a target on the mask grid: "center" samples each cell's centre
    # pixel (official, 0/1); "area" takes the fraction of the cell the object covers, which
    # keeps sub-cell boundaries (docs/diffusioninst_recipe.md: +12 mask AP of the stride-4
    # ceiling on the synthetic set, yet 4.6 mask AP less for the trained main job).
    m.MASK_TARGET = "center"
    # Smoothing term of the dice denominator.
    m.DICE_EPS = 1e-5
    # Mask probability above which a pixel belongs to the instance.
    m.MASK_THRESHOLD = 0.5
    # Zero each final mask outside its detection's box, as the official post-processing does.
    m.CLIP_MASKS_TO_BOXES = True


def validate_diffusioninst_config(cfg):
    """Raise a clear ``ValueError`` for mask settings that would only fail later."""
    m = cfg.MODEL.DiffusionInst
    is_inst = cfg.MODEL.META_ARCHITECTURE == "DiffusionInst"
    in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    channels = list(m.MASK_HEAD_CHANNELS)
    checks = [
        (
            not is_inst or cfg.MODEL.MASK_ON,
            "MODEL.MASK_ON must be True for DiffusionInst (the data loader reads masks only then)",
        ),
        (len(m.MASK_IN_FEATURES) >= 1, "MODEL.DiffusionInst.MASK_IN_FEATURES must not be empty"),
        (
            # Only a DiffusionInst reads them: a detector sharing the config (e.g. on a backbone
            # without p2) must not fail on an unused key.
            not is_inst or all(f in in_features for f in m.MASK_IN_FEATURES),
            f"MODEL.DiffusionInst.MASK_IN_FEATURES {tuple(m.MASK_IN_FEATURES)} must be among "
            f"MODEL.ROI_HEADS.IN_FEATURES {tuple(in_features)}",
        ),
        (
            len(channels) >= 1 and all(c >= 1 for c in channels) and channels[-1] == 1,
            "MODEL.DiffusionInst.MASK_HEAD_CHANNELS must be positive with a last value of 1, got "
            f"{tuple(channels)}",
        ),
        (m.MASK_BRANCH_CHANNELS >= 1, "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS must be >= 1"),
        (m.MASK_NUM_CONVS >= 0, "MODEL.DiffusionInst.MASK_NUM_CONVS must be >= 0"),
        (m.MASK_FEAT_CHANNELS >= 1, "MODEL.DiffusionInst.MASK_FEAT_CHANNELS must be >= 1"),
        (m.MASK_WEIGHT >= 0, f"MODEL.DiffusionInst.MASK_WEIGHT must be >= 0, got {m.MASK_WEIGHT}"),
        (
            isinstance(m.MASK_REL_COORDS, bool),
            f"MODEL.DiffusionInst.MASK_REL_COORDS must be True or False, got {m.MASK_REL_COORDS!r}",
        ),
        (
            m.MASK_TARGET in ("center", "area"),
            f"MODEL.DiffusionInst.MASK_TARGET must be 'center' or 'area', got {m.MASK_TARGET!r}",
        ),
        (m.DICE_EPS >= 0, f"MODEL.DiffusionInst.DICE_EPS must be >= 0, got {m.DICE_EPS}"),
        (
            0.0 < m.MASK_THRESHOLD < 1.0,
            f"MODEL.DiffusionInst.MASK_THRESHOLD must be in (0, 1), got {m.MASK_THRESHOLD}",
        ),
        (
            m.MASK_NORM in ("", "BN", "SyncBN", "GN", "naiveSyncBN", "FrozenBN"),
            f"MODEL.DiffusionInst.MASK_NORM {m.MASK_NORM!r} is not a detectron2 norm name",
        ),
        (
            # detectron2's "GN" is GroupNorm with 32 groups over the branch width.
            m.MASK_NORM != "GN" or m.MASK_BRANCH_CHANNELS % 32 == 0,
            "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS must be a multiple of 32 with MASK_NORM 'GN',"
            f" got {m.MASK_BRANCH_CHANNELS}",
        ),
    ]
    errors = [msg for ok, msg in checks if not ok]
    if errors:
        raise ValueError("Invalid DiffusionInst config:\n  " + "\n  ".join(errors))


# build_model looks the meta-architecture up by the name in the config: importing the modeling
# package registers "DiffusionInst" (and, through diffusiondet.modeling, "DiffusionDet").
register_config_extension(
    "diffusioninst",
    add_config=add_diffusioninst_config,
    validate=validate_diffusioninst_config,
    registers=("diffusioninst.modeling",),
)


def build_config(config_file="", opts=(), steps=None, boxes=None, extensions=(), trust_config=None):
    """``diffusiondet.config.build_config`` with the DiffusionInst extension first: builds
    DiffusionDet and DiffusionInst configs alike (the mask keys are unused by DiffusionDet).

    ``extensions`` names further extensions, applied after DiffusionInst's; ``trust_config`` as
    there (YAML tags that run code).
    """
    return build_diffusiondet_config(
        config_file,
        opts,
        steps=steps,
        boxes=boxes,
        extensions=("diffusioninst", *extensions),
        trust_config=trust_config,
    )
