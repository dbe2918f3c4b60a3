"""detectron2's FPN (``MODEL.FPN.*``) over any bottom-up backbone, as ``build_resnet_fpn_backbone``
builds it for ResNets: p2..p6, the extra p6 max-pooled from p5."""
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool


def fpn_over(bottom_up: Backbone, cfg) -> FPN:
    """FPN with ``MODEL.FPN.IN_FEATURES / OUT_CHANNELS / NORM / FUSE_TYPE`` on ``bottom_up``."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
