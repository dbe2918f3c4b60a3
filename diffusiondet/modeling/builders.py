"""Config -> component builders used by ``DiffusionDet.from_config``.

This is the only place in ``modeling/`` (besides ``from_config``) that reads a cfg: the head,
matcher, criterion and sampler themselves take plain keyword arguments. Each ``*_kwargs``
function returns those arguments, so a subclass (DiffusionInst) builds its own head or criterion
class from them plus its extra arguments without repeating them.
"""
import logging
from typing import Any, Dict, List

import torch

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import get_fed_loss_cls_weights
from detectron2.layers import ShapeSpec

from .acceleration import SpeedOptions, accelerate_head
from .criterion import SetCriterion
from .head import DynamicHead
from .matcher import DynamicKMatcher
from .graph_sampler import GraphBoxSampler
from .sampler import DDIMBoxSampler

logger = logging.getLogger(__name__)


def head_kwargs(cfg, input_shapes: List[ShapeSpec]) -> Dict[str, Any]:
    """:class:`DynamicHead` arguments for pooled levels of ``input_shapes`` (finest first)."""
    d = cfg.MODEL.DiffusionDet
    channels = {s.channels for s in input_shapes}
    if len(channels) != 1:
        raise ValueError(f"All pooled feature levels must have the same channels, got {channels}")
    box_head = cfg.MODEL.ROI_BOX_HEAD
    return dict(
        num_classes=d.NUM_CLASSES,
        in_channels=channels.pop(),
        pooler_resolution=box_head.POOLER_RESOLUTION,
        pooler_scales=[1.0 / s.stride for s in input_shapes],
        sampling_ratio=box_head.POOLER_SAMPLING_RATIO,
        pooler_type=box_head.POOLER_TYPE,
        hidden_dim=d.HIDDEN_DIM,
        dim_feedforward=d.DIM_FEEDFORWARD,
        nhead=d.NHEADS,
        dropout=d.DROPOUT,
        activation=d.ACTIVATION,
        num_stages=d.NUM_HEADS,
        num_cls=d.NUM_CLS,
        num_reg=d.NUM_REG,
        dim_dynamic=d.DIM_DYNAMIC,
        num_dynamic=d.NUM_DYNAMIC,
        use_focal=d.USE_FOCAL or d.USE_FED_LOSS,
        prior_prob=d.PRIOR_PROB,
        deep_supervision=d.DEEP_SUPERVISION,
        scale_clamp=d.BBOX_SCALE_CLAMP,
    )


def build_head(cfg, input_shapes: List[ShapeSpec]) -> DynamicHead:
    """The head alone, with the config's speed options, as a model built from ``cfg`` has it."""
    head = DynamicHead(**head_kwargs(cfg, input_shapes))
    accelerate_head(head, SpeedOptions.from_config(cfg))
    return head


def _fed_loss_weights(cfg) -> torch.Tensor:
    d = cfg.MODEL.DiffusionDet
    names = cfg.DATASETS.TRAIN
    if names and all(hasattr(MetadataCatalog.get(n), "class_image_count") for n in names):
        return get_fed_loss_cls_weights(names, d.FED_LOSS_FREQ_WEIGHT_POWER)
    # Checkpoint loading / evaluation does not need the training statistics: the buffer is
    # overwritten by the checkpoint. Training with uniform weights is still valid, so warn only.
    logger.warning(
        "USE_FED_LOSS: no 'class_image_count' metadata for %s; using uniform class weights", names
    )
    return torch.ones(d.NUM_CLASSES)


def matcher_kwargs(cfg) -> Dict[str, Any]:
    d = cfg.MODEL.DiffusionDet
    return dict(
        cost_class=d.CLASS_WEIGHT,
        cost_bbox=d.L1_WEIGHT,
        cost_giou=d.GIOU_WEIGHT,
        use_focal=d.USE_FOCAL,
        use_fed_loss=d.USE_FED_LOSS,
        focal_alpha=d.ALPHA,
        focal_gamma=d.GAMMA,
        ota_k=d.OTA_K,
        center_radius=d.CENTER_RADIUS,
        not_in_both_cost=d.NOT_IN_BOTH_COST,
        not_fg_cost=d.NOT_FG_COST,
    )


def criterion_kwargs(cfg) -> Dict[str, Any]:
    """:class:`SetCriterion` arguments, with its :class:`DynamicKMatcher` built."""
    d = cfg.MODEL.DiffusionDet
    return dict(
        num_classes=d.NUM_CLASSES,
        matcher=DynamicKMatcher(**matcher_kwargs(cfg)),
        class_weight=d.CLASS_WEIGHT,
        l1_weight=d.L1_WEIGHT,
        giou_weight=d.GIOU_WEIGHT,
        deep_supervision=d.DEEP_SUPERVISION,
        use_focal=d.USE_FOCAL,
        use_fed_loss=d.USE_FED_LOSS,
        focal_alpha=d.ALPHA,
        focal_gamma=d.GAMMA,
        fed_loss_cls_weights=_fed_loss_weights(cfg) if d.USE_FED_LOSS else None,
        fed_loss_num_classes=d.FED_LOSS_NUM_CLASSES,
        no_object_weight=d.NO_OBJECT_WEIGHT,
    )


def build_criterion(cfg) -> SetCriterion:
    return SetCriterion(**criterion_kwargs(cfg))


def sampler_kwargs(cfg) -> Dict[str, Any]:
    d = cfg.MODEL.DiffusionDet
    return dict(
        steps=d.SAMPLE_STEP,
        eta=d.DDIM_ETA,
        snr_scale=d.SNR_SCALE,
        box_renewal=d.BOX_RENEWAL,
        renewal_threshold=d.RENEWAL_THRESHOLD,
        ensemble=d.ENSEMBLE,
        use_focal=d.USE_FOCAL or d.USE_FED_LOSS,
        use_nms=d.USE_NMS,
        nms_threshold=d.NMS_THRESH,
        detections_per_image=d.DETECTIONS_PER_IMAGE,
        skip_unused_calls=d.SKIP_UNUSED_CALLS,
        update=d.SAMPLER_UPDATE,
    )


def build_sampler(cfg) -> DDIMBoxSampler:
    d = cfg.MODEL.DiffusionDet
    if d.SAMPLING_MODE == "graph":
        return GraphBoxSampler(compile_step=d.COMPILE_SAMPLING_STEP, **sampler_kwargs(cfg))
    return DDIMBoxSampler(**sampler_kwargs(cfg))
