"""diffusiondet/modeling/builders.py, config -> components: every key reaches its component, also
when it differs from the component's own default (mutation testing found dropped keyword arguments
whose default equalled the tiny config's value).

Only construction is checked here (no forward passes), so the file runs in well under a second.
"""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec

from diffusiondet.modeling.builders import build_criterion, build_head, build_sampler
from tests.utils import tiny_cfg

D = "MODEL.DiffusionDet."
SHAPES = [ShapeSpec(channels=32, stride=s) for s in (4, 8, 16, 32)]


def test_every_head_key_reaches_the_head():
    cfg = tiny_cfg(
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5,
        "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO", 3,
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign",
        D + "DROPOUT", 0.25,
        D + "ACTIVATION", "gelu",
        D + "NUM_CLS", 2,
        D + "NUM_REG", 1,
        D + "PRIOR_PROB", 0.1,
        D + "DEEP_SUPERVISION", False,
        D + "BBOX_SCALE_CLAMP", 5.0,
        D + "DYNAMIC_CHUNK_SIZE", 7,
    )
    head = build_head(cfg, SHAPES)
    pooler = head.box_pooler
    assert pooler.output_size == (5, 5)
    assert [p.sampling_ratio for p in pooler.level_poolers] == [3] * 4
    assert not any(p.aligned for p in pooler.level_poolers)  # ROIAlign, not ROIAlignV2
    assert [p.spatial_scale for p in pooler.level_poolers] == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert head.deep_supervision is False and len(head.head_series) == 2
    stage = head.head_series[1]
    assert stage.dropout.p == 0.25 and stage.activation is F.gelu
    assert len(stage.cls_module) == 2 * 3 and len(stage.reg_module) == 1 * 3
    assert stage.inst_interact.out_layer.in_features == 32 * 5 * 5
    assert stage.inst_interact.chunk_size == 7
    assert stage.box2box_transform.scale_clamp == 5.0
    assert stage.class_logits.out_features == 3  # sigmoid: K logits
    expected_bias = -math.log((1 - 0.1) / 0.1)
    torch.testing.assert_close(stage.class_logits.bias, torch.full((3,), expected_bias))


def test_softmax_head_has_a_background_logit():
    head = build_head(tiny_cfg(D + "USE_FOCAL", False), SHAPES)
    assert head.head_series[0].class_logits.out_features == 3 + 1


def test_mismatched_feature_channels_are_rejected_with_their_values():
    shapes = [ShapeSpec(channels=32, stride=4), ShapeSpec(channels=16, stride=8)]
    with pytest.raises(ValueError, match=r"same channels, got \{(16, 32|32, 16)\}"):
        build_head(tiny_cfg(), shapes)


def test_every_matcher_and_criterion_key_reaches_them():
    cfg = tiny_cfg(
        D + "CLASS_WEIGHT", 3.0,
        D + "L1_WEIGHT", 4.0,
        D + "GIOU_WEIGHT", 1.5,
        D + "ALPHA", 0.3,
        D + "GAMMA", 1.5,
        D + "OTA_K", 3,
        D + "CENTER_RADIUS", 1.5,
        D + "NOT_IN_BOTH_COST", 50.0,
        D + "NOT_FG_COST", 5000.0,
        D + "DEEP_SUPERVISION", False,
        D + "FED_LOSS_NUM_CLASSES", 7,
    )
    criterion = build_criterion(cfg)
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (3.0, 4.0, 1.5)
    assert m.use_focal is True and m.use_fed_loss is False
    assert (m.focal_alpha, m.focal_gamma, m.ota_k, m.center_radius) == (0.3, 1.5, 3, 1.5)
    assert (m.not_in_both_cost, m.not_fg_cost) == (50.0, 5000.0)
    assert criterion.weight_dict == {"loss_ce": 3.0, "loss_bbox": 4.0, "loss_giou": 1.5}
    assert criterion.deep_supervision is False and criterion.use_focal is True
    assert (criterion.focal_alpha, criterion.focal_gamma) == (0.3, 1.5)
    assert criterion.fed_loss_num_classes == 7 and criterion.use_fed_loss is False


def test_softmax_criterion_keeps_the_no_object_weight():
    criterion = build_criterion(tiny_cfg(D + "USE_FOCAL", False, D + "NO_OBJECT_WEIGHT", 0.3))
    assert criterion.use_focal is False and criterion.matcher.use_focal is False
    torch.testing.assert_close(criterion.empty_weight, torch.tensor([1.0, 1.0, 1.0, 0.3]))


@pytest.fixture
def counted_dataset():
    name = "builders_counted_dataset"
    MetadataCatalog.get(name).set(
        class_image_count=[
            {"id": 2, "image_count": 9}, {"id": 1, "image_count": 4}, {"id": 3, "image_count": 1},
        ]
    )
    yield name
    MetadataCatalog.remove(name)


def test_federated_weights_come_from_the_training_sets_image_counts(counted_dataset):
    cfg = tiny_cfg(
        D + "USE_FED_LOSS", True,
        D + "FED_LOSS_FREQ_WEIGHT_POWER", 0.5,
        "DATASETS.TRAIN", (counted_dataset,),
    )
    criterion = build_criterion(cfg)
    assert criterion.matcher.use_fed_loss is True
    torch.testing.assert_close(criterion.fed_loss_cls_weights, torch.tensor([2.0, 3.0, 1.0]))


def test_federated_weights_without_counts_are_uniform_and_warned(caplog):
    cfg = tiny_cfg(D + "USE_FED_LOSS", True, "DATASETS.TRAIN", ("no_counts_dataset_x",))
    with caplog.at_level(logging.WARNING):
        criterion = build_criterion(cfg)
    torch.testing.assert_close(criterion.fed_loss_cls_weights, torch.ones(3))
    assert "class_image_count" in caplog.text


def test_no_federated_lookup_without_the_federated_loss(caplog):
    cfg = tiny_cfg("DATASETS.TRAIN", ("no_counts_dataset_y",))
    with caplog.at_level(logging.WARNING):
        criterion = build_criterion(cfg)
    assert "USE_FED_LOSS" not in caplog.text
    assert not hasattr(criterion, "fed_loss_cls_weights")


def test_every_sampler_key_reaches_the_sampler():
    cfg = tiny_cfg(
        D + "SAMPLE_STEP", 3,
        D + "DDIM_ETA", 0.5,
        D + "SNR_SCALE", 1.5,
        D + "BOX_RENEWAL", False,
        D + "RENEWAL_THRESHOLD", 0.3,
        D + "USE_NMS", False,
        D + "NMS_THRESH", 0.6,
        D + "DETECTIONS_PER_IMAGE", 9,
        D + "ENSEMBLE", "all_steps",
        D + "SKIP_UNUSED_CALLS", False,
    )
    s = build_sampler(cfg)
    assert (s.steps, s.eta, s.snr_scale) == (3, 0.5, 1.5)
    assert s.box_renewal is False and s.renewal_threshold == 0.3
    assert s.use_nms is False and s.nms_threshold == 0.6
    assert (s.detections_per_image, s.ensemble, s.skip_unused_calls) == (9, "all_steps", False)
    assert s.use_focal is True
    assert build_sampler(tiny_cfg(D + "USE_FOCAL", False)).use_focal is False
    assert build_sampler(tiny_cfg(D + "USE_FOCAL", False, D + "USE_FED_LOSS", True)).use_focal
