"""Head details the other tests leave open (found by mutation testing): the threaded pooler is
really used (and matches detectron2 on one level, oversized and NaN boxes, and under tracing),
DynamicConv's chunk sizing and autograd modes, stage defaults, and the time embedding's dtype.

Pooler outputs are compared bit for bit with detectron2's serial ``ROIPooler``: both run the same
kernel on the same data, so no tolerance is involved.
"""
import threading

import pytest
import torch

from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes

from diffusiondet.modeling.head import (
    DynamicHead,
    DynamicConv,
    RefinementStage,
    SinusoidalTimeEmbedding,
    ThreadedROIPooler,
)
from diffusiondet.modeling.head import dynamic_conv, threaded_pooler

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def _poolers(num_threads, scales=SCALES):
    kwargs = dict(output_size=3, scales=scales, sampling_ratio=2, pooler_type="ROIAlignV2")
    return ROIPooler(**kwargs), ThreadedROIPooler(**kwargs, num_threads=num_threads)


def _features(scales=SCALES, channels=4):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, channels, int(64 * s), int(96 * s), generator=g) for s in scales]


def _pool_recording_threads(pooler, features, box_lists):
    names = []
    level = pooler.level_poolers[0]
    original = level.forward

    def recording(*args):
        names.append(threading.current_thread().name)
        return original(*args)

    level.forward = recording
    try:
        return pooler(features, box_lists), names
    finally:
        del level.forward


def test_threaded_pooler_really_pools_in_worker_threads():
    # Two RoIs on one level, grad mode on but nothing requires grad: the threaded path applies.
    _, pooler = _poolers(2, scales=(1 / 4,))
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]))]
    out, names = _pool_recording_threads(pooler, _features((1 / 4,)), boxes)
    assert out.shape == (2, 4, 3, 3)
    assert len(names) == 2 and any(n.startswith("diffdet-roi-pool") for n in names)
    assert ThreadedROIPooler(output_size=3, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2",
                             num_threads=3).resolved_num_threads() == 3
    assert pooler.__class__(output_size=3, scales=SCALES, sampling_ratio=2, pooler_type="ROIAlignV2",
                            num_threads=0).resolved_num_threads() == torch.get_num_threads()


def test_worker_pool_is_created_on_first_use_and_reused(monkeypatch):
    monkeypatch.setattr(threaded_pooler, "_executor", (0, None))
    serial, pooler = _poolers(2)
    features = _features()
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0]]))]
    with torch.no_grad():
        assert torch.equal(pooler(features, boxes), serial(features, boxes))
    first = threaded_pooler._executor[1]
    try:
        assert first is not None and threaded_pooler.shared_executor(1) is first
    finally:
        first.shutdown(wait=True)  # monkeypatch restores the previous pool


@torch.no_grad()
def test_threaded_pooler_matches_detectron2_on_one_level_and_oversized_boxes():
    single_serial, single = _poolers(2, scales=(1 / 8,))
    boxes = [Boxes(torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0], [1.0, 2.0, 3.0, 9.0]]))]
    features = _features((1 / 8,))
    assert torch.equal(single(features, boxes), single_serial(features, boxes))
    # A ~1100 px box maps beyond the coarsest level and must be clamped to it, not dropped.
    serial, pooler = _poolers(2)
    boxes = [Boxes(torch.tensor([[-300.0, -300.0, 1000.0, 600.0], [10.0, 10.0, 30.0, 40.0]]))]
    out = pooler(_features(), boxes)
    assert torch.equal(out, serial(_features(), boxes)) and out[0].abs().sum() > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_threaded_pooler_is_not_used_while_tracing():
    serial, pooler = _poolers(2)
    feats_a, feats_b = _features(), [f * 2 + 1 for f in _features()]
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0], [5.0, 5.0, 200.0, 150.0]])

    def pool(*feats):
        return pooler(list(feats), [Boxes(boxes)])

    with torch.no_grad():
        traced = torch.jit.trace(pool, tuple(feats_a), check_trace=False)
        assert torch.equal(traced(*feats_b), serial(feats_b, [Boxes(boxes)]))


# --- DynamicConv ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cache, expected", [(0, 16 << 20), (1, 4 << 20), (8 << 20, 4 << 20),
                                             (20_000_001, 10_000_000), (1 << 30, 16 << 20)])
def test_chunk_budget_is_half_the_cache_within_bounds(monkeypatch, cache, expected):
    monkeypatch.setattr(dynamic_conv, "last_level_cache_bytes", lambda: cache)
    budget = dynamic_conv.auto_chunk_bytes()
    assert budget == expected and isinstance(budget, int)


def test_chunk_size_is_at_least_one_proposal(monkeypatch):
    conv = DynamicConv(hidden_dim=8, dim_dynamic=4, pooler_resolution=2)
    assert conv.resolved_chunk_size(1, torch.float32, needs_grad=True) == 1
    assert conv.resolved_chunk_size(1, torch.float32, needs_grad=False, on_cpu=False) == 1
    monkeypatch.setattr(dynamic_conv, "auto_chunk_bytes", lambda: 100)  # < one proposal (256 B)
    assert conv.resolved_chunk_size(50, torch.float32, needs_grad=False) == 1


@pytest.mark.parametrize("trainable", ["weights", "proposals", "rois"])
def test_dynamic_conv_backpropagates_to_whatever_requires_grad(trainable):
    conv = DynamicConv(hidden_dim=8, dim_dynamic=4, pooler_resolution=2)
    conv.requires_grad_(trainable == "weights")
    pro = torch.randn(3, 8, requires_grad=trainable == "proposals")
    roi = torch.randn(3, 4, 8, requires_grad=trainable == "rois")
    out = conv(pro, roi)
    out.sum().backward()
    grad = {"weights": conv.dynamic_layer.weight.grad, "proposals": pro.grad, "rois": roi.grad}
    assert grad[trainable] is not None and grad[trainable].abs().sum() > 0


# --- refinement stage and time embedding -------------------------------------------------------


def test_refinement_stage_defaults_are_the_official_layout():
    stage = RefinementStage(num_logits=3, hidden_dim=16, pooler_resolution=2, scale_clamp=4.0)
    assert stage.linear1.out_features == 2048 and stage.self_attn.num_heads == 8
    assert stage.dropout.p == 0.0 and stage.self_attn.dropout == 0.0
    assert stage.activation is torch.nn.functional.relu
    assert len(stage.cls_module) == 1 * 3 and len(stage.reg_module) == 3 * 3
    assert stage.inst_interact.dim_dynamic == 64 and stage.inst_interact.chunk_size == 0
    assert stage.box2box_transform.weights == (2.0, 2.0, 1.0, 1.0)
    dropped = RefinementStage(num_logits=3, hidden_dim=16, pooler_resolution=2, scale_clamp=4.0,
                              dropout=0.3, nhead=2)
    assert dropped.self_attn.dropout == 0.3 and dropped.dropout1.p == 0.3
    with pytest.raises(ValueError, match=r"^activation must be one of \['gelu', 'glu', 'relu'\], got 'tanh'$"):
        RefinementStage(num_logits=3, hidden_dim=16, pooler_resolution=2, scale_clamp=4.0,
                        activation="tanh")


def test_time_embedding_is_in_the_buffer_dtype_for_float64_timesteps():
    emb = SinusoidalTimeEmbedding(8)
    out = emb(torch.tensor([3.0, 999.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert torch.equal(out, emb(torch.tensor([3, 999])))


def test_time_embedding_sizes_and_its_float32_frequencies():
    SinusoidalTimeEmbedding(4)
    for dim in (5, 2, 7):
        with pytest.raises(ValueError, match=rf"^SinusoidalTimeEmbedding needs an even dim >= 4, got {dim}$"):
            SinusoidalTimeEmbedding(dim)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert SinusoidalTimeEmbedding(8).frequencies.dtype == torch.float32
    finally:
        torch.set_default_dtype(previous)


# --- DynamicHead ----------------------------------------------------------------------------------


def _head(**kwargs):
    args = dict(num_classes=3, in_channels=16, hidden_dim=16, dim_feedforward=32, nhead=2,
                num_stages=2, dim_dynamic=4, pooler_scales=SCALES)
    return DynamicHead(**{**args, **kwargs})


def test_dynamic_head_passes_its_settings_to_every_stage():
    head = _head(dropout=0.2, activation="gelu", num_cls=2, num_reg=1, bbox_weights=(1.0, 1.0, 3.0, 3.0))
    assert head.num_classes == 3 and head.hidden_dim == 16
    for stage in head.head_series:
        assert stage.dropout.p == 0.2 and stage.activation is torch.nn.functional.gelu
        assert len(stage.cls_module) == 6 and len(stage.reg_module) == 3
        assert stage.box2box_transform.weights == (1.0, 1.0, 3.0, 3.0)
    default = _head()
    assert default.head_series[0].inst_interact.chunk_size == 0
    assert default.box_pooler.num_threads == 0
    with pytest.raises(ValueError, match=r"^in_channels \(8\) must equal hidden_dim \(16\): RoI features "
                                         r"are used directly as object features$"):
        _head(in_channels=8)


def test_threaded_pooler_takes_detectron2_arguments_positionally():
    pooler = ThreadedROIPooler(3, SCALES, 2, "ROIAlignV2")
    assert pooler.output_size == (3, 3) and len(pooler.level_poolers) == 4
    assert pooler.num_threads == 0


def test_speed_options_accept_automatic_values_and_reach_every_stage():
    head = _head()
    head.set_speed_options(dynamic_chunk_size=5, pooler_threads=0)
    assert [s.inst_interact.chunk_size for s in head.head_series] == [5, 5]
    assert head.box_pooler.num_threads == 0
    head.set_speed_options(dynamic_chunk_size=0, pooler_threads=3)
    assert head.box_pooler.num_threads == 3
    with pytest.raises(ValueError, match=r"^dynamic_chunk_size and pooler_threads must be >= 0, got 0 and -1$"):
        head.set_speed_options(dynamic_chunk_size=0, pooler_threads=-1)
