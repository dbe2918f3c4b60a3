"""FixedShapeROIPooler reproduces detectron2's ROIPooler with static shapes and no host syncs.

Shape legend: B images, N boxes per image, C channels, R = 7 pooled side. Boxes are abs xyxy on a
non-square 96×160 (H×W) padded input, so the FPN levels are 24×40, 12×20, 6×10 and 3×5.

Tolerances: both poolers sum the same products in a different order (torchvision: corners, then
samples, then ÷ s²; here: one weighted sum of 4·s² taps), so they differ by float32 rounding of
sums of O(1) values: measured ≤ 7.2e-7 in the forward (sampling ratio 1-3, both pooler types,
one or four levels) and ≤ 3.0e-6 in the feature gradients (sums of up to hundreds of
contributions, scattered in another order); 1e-5 leaves a margin. A wrong coordinate, mask or
level moves values by O(0.1-1).
"""
import warnings

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from diffusiondet.modeling.acceleration.fixed_shape_pooler import (
    FixedShapeROIPooler,
    PackedFeatures,
    weighted_gather,
    assign_levels,
)

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
HEIGHT, WIDTH, CHANNELS = 96, 160, 8
TOL = 1e-5


def _features(batch=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, CHANNELS, HEIGHT >> 2 + i, WIDTH >> 2 + i, generator=gen, dtype=dtype)
        for i in range(4)
    ]


def _boxes(nan=True):
    """(2, 40, 4): random sizes 1-400 px (every level), partly/fully outside, plus edge cases."""
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 40, 2, generator=gen) * torch.tensor([WIDTH + 60.0, HEIGHT + 40.0]) - 30
    wh = torch.exp(torch.rand(2, 40, 2, generator=gen) * 6.0)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    special = [
        [0.0, 0.0, WIDTH, HEIGHT],  # the whole image, touching every border
        [0.0, 0.0, 16.0, 8.0],  # touching the top-left corner
        [WIDTH - 8.0, HEIGHT - 12.0, WIDTH, HEIGHT],  # touching the bottom-right corner
        [WIDTH - 300.0, 10.0, WIDTH, 60.0],  # large, ending on the right border
        [WIDTH + 10.0, 5.0, WIDTH + 70.0, 40.0],  # entirely right of the image
        [-90.0, -80.0, -10.0, -9.0],  # entirely above-left
        [-40.0, -30.0, 30.0, 20.0],  # partly outside
        [50.0, 20.0, 50.3, 20.2],  # tiny
        [33.0, 44.0, 33.0, 44.0],  # zero area (point)
        [10.0, 10.0, 10.0, 70.0],  # zero width
        [70.0, 60.0, 40.0, 20.0],  # both sides flipped: positive area, pooled mirrored
        [80.0, 20.0, 60.0, 50.0],  # one side flipped: negative area, no level, zero row
        [WIDTH + 5.0, HEIGHT + 5.0, WIDTH + 8.0, HEIGHT + 8.0],  # past p2's one-pixel margin
        [-250.0, -200.0, 300.0, 250.0],  # 497 px: the coarsest level, covering the image
    ]
    boxes[0, : len(special)] = torch.tensor(special)
    boxes[1, -len(special) :] = torch.tensor(special).flip(0)
    if nan:
        boxes[1, 3] = float("nan")
        boxes[0, 30, 2] = float("nan")
    return boxes


def _reference(features, boxes, **kwargs):
    pooler = ROIPooler(**{"output_size": 7, "scales": SCALES, "sampling_ratio": 2,
                          "pooler_type": "ROIAlignV2", **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pooler(features, [Boxes(image_boxes) for image_boxes in boxes])


def _pooler(**kwargs):
    return FixedShapeROIPooler(**{"output_size": 7, "scales": SCALES, "sampling_ratio": 2,
                                  "pooler_type": "ROIAlignV2", **kwargs})


def _op_recorder(ops):
    """A torch.compile backend (AOT autograd, run eagerly) that records every aten op traced,
    and tensor constants as "constant"."""

    def record(gm, _inputs):
        ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        ops.update("constant" for node in gm.graph.nodes if node.op == "get_attr")
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


@pytest.mark.numerics
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
def test_matches_detectron2_roipooler(pooler_type, sampling_ratio):
    features, boxes = _features(), _boxes()
    kwargs = dict(pooler_type=pooler_type, sampling_ratio=sampling_ratio)
    ref = _reference(features, boxes, **kwargs)
    out = _pooler(**kwargs)(features, boxes)
    assert out.shape == ref.shape == (80, CHANNELS, 7, 7)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Every level is exercised (NaN / negative-area boxes get no level at all).
    levels = assign_boxes_to_levels([Boxes(b) for b in boxes], 2, 5, 224, 4)
    assert set(levels.tolist()) >= {0, 1, 2, 3}
    assert (out - ref).abs().max() <= TOL  # measured ≤ 7.2e-7
    flat = boxes.reshape(-1, 4)
    dropped = torch.isnan(flat).any(1) | ((flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1]) < 0)
    assert dropped.sum() == 4 and not out[dropped].any() and not ref[dropped].any()
    outside = torch.tensor([4, 5, 12])  # image 0's fully-outside boxes pool only zero weights
    assert not out[outside].any() and out[~dropped].abs().amax((1, 2, 3)).gt(0).sum() > 40


@pytest.mark.numerics
@pytest.mark.parametrize("pooler_type", ["ROIAlignV2", "ROIAlign"])
def test_single_level_matches(pooler_type):
    # One level: ROIPooler skips the level rule, so even the negative-area box is pooled.
    features, boxes = [_features()[1]], _boxes(nan=False)
    kwargs = dict(scales=(1 / 8,), pooler_type=pooler_type)
    ref = _reference(features, boxes, **kwargs)
    out = _pooler(**kwargs)(features, boxes)
    assert (out - ref).abs().max() <= TOL  # measured ≤ 4.8e-7
    assert out[11].abs().max() > 0.1  # the negative-area box


@pytest.mark.numerics
def test_float64_and_low_precision():
    features, boxes = _features(dtype=torch.float64), _boxes().double()
    out = _pooler()(features, boxes)
    assert out.dtype == torch.float64
    assert (out - _reference(features, boxes)).abs().max() <= 1e-12  # measured 6.7e-16
    half = _pooler()([f.bfloat16() for f in features], boxes.float())
    assert half.dtype == torch.bfloat16 and (half.double() - out).abs().max() < 0.05


def test_packed_features_equal_list_path():
    pooler, features, boxes = _pooler(), _features(), _boxes()
    packed = pooler.pack(features)
    assert isinstance(packed, PackedFeatures)
    assert packed.levels == ((0, 24, 40), (960, 12, 20), (1200, 6, 10), (1260, 3, 5))
    assert packed.table.shape == (2 * 1275, CHANNELS)
    assert torch.equal(pooler(packed, boxes), pooler(features, boxes))
    first_five = [0, 1, 2, 3, 4, 40, 41, 42, 43, 44]
    assert torch.equal(pooler(packed, boxes[:, :5]), pooler(features, boxes)[first_five])


@pytest.mark.numerics
@pytest.mark.parametrize("fused", [True, False])
def test_feature_gradients_match_and_boxes_get_none(fused, monkeypatch):
    import diffusiondet.modeling.acceleration.fixed_shape_pooler as module

    # Both kernels: the fused embedding_bag (CPU) and the per-tap gather (every other device).
    kernel = lambda t, i, w: weighted_gather(t, i, w, fused)  # noqa: E731
    monkeypatch.setattr(module, "weighted_gather", kernel)
    weight = torch.randn(80, CHANNELS, 7, 7, generator=torch.Generator().manual_seed(2))
    grads = []
    for run in (_reference, _pooler()):
        features = [f.requires_grad_() for f in _features()]
        boxes = _boxes().requires_grad_()
        (run(features, boxes) * weight).sum().backward()
        grads.append(torch.cat([f.grad.flatten() for f in features]))
        assert boxes.grad is None  # roi_align has no box gradient either
    assert (grads[0] - grads[1]).abs().max() <= TOL  # measured 9.5e-7 fused, 3.0e-6 per tap


def test_compiles_fullgraph_without_sync_ops():
    pooler, features, boxes = _pooler(), _features(), _boxes()
    ops = set()
    compiled = torch.compile(pooler, fullgraph=True, backend=_op_recorder(ops))
    # aot_eager-style tracing runs the same aten kernels, so the results are identical.
    assert torch.equal(compiled(features, boxes), pooler(features, boxes))
    packed = pooler.pack(features)
    assert torch.equal(compiled(packed, boxes), pooler(packed, boxes))
    # The per-tap kernel (every non-CPU device) with its backward.
    gather = torch.compile(
        lambda t, i, w: weighted_gather(t, i, w, fused=False), fullgraph=True,
        backend=_op_recorder(ops),
    )
    table = packed.table.clone().requires_grad_()
    index = torch.randint(0, table.shape[0], (50, 16))
    gather(table, index, torch.rand(50, 16)).sum().backward()
    assert "aten.index_add.default" in ops or "aten.index_put.default" in ops, sorted(ops)
    # Ops with a data-dependent output shape or a read-back to the host (the embedding
    # backwards sort with a host sync on CUDA): none may appear in either graph.
    syncing = {"nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "_unique2",
               "unique_consecutive", "embedding_dense_backward", "_embedding_bag_backward",
               "_embedding_bag_dense_backward"}
    assert not {op for op in ops if op.split(".")[1:2] in ([name] for name in syncing)}, sorted(ops)
    # Nor tensors built from Python lists: under eager CUDA-graph capture they are host copies.
    assert not {"constant", "aten.lift_fresh_copy.default"} & ops, sorted(ops)


def test_level_assignment_equals_detectron2():
    boxes = _boxes()
    ref = assign_boxes_to_levels([Boxes(b) for b in boxes], 2, 5, 224, 4)
    ours = assign_levels(boxes, 2, 5, 224, 4).flatten()
    valid = ~torch.isnan(ours)
    assert torch.equal(ours[valid].long(), ref[valid])
    assert not ((ref[~valid] >= 0) & (ref[~valid] <= 3)).any()  # d2 pools them on no level
    # Exact boundaries: 112 px is level 3, 111.9 level 2; 448 level 5 (and clamped above).
    # In float64 the 1e-8 of the rule decides 112·(1 - 2e-8) px: level 3 (not 2) in both.
    side = 112 * (1 - 2e-8)
    edges = torch.tensor(
        [[[0, 0, 112.0, 112], [0, 0, 111.9, 111.9], [0, 0, 448, 448], [0, 0, 2e4, 2e4],
          [0, 0, side, side]]],
        dtype=torch.float64,
    )
    assert assign_levels(edges, 2, 5, 224, 4).tolist() == [[1.0, 0.0, 3.0, 3.0, 1.0]]
    assert assign_boxes_to_levels([Boxes(edges[0])], 2, 5, 224, 4).tolist() == [1, 0, 3, 3, 1]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(pooler_type="ROIPool"),
        dict(pooler_type="ROIAlignRotated"),
        dict(sampling_ratio=0),
        dict(sampling_ratio=-1),
        dict(sampling_ratio=1.5),
        dict(output_size=0),
        dict(output_size=(7, 7, 7)),
        dict(scales=()),
        dict(scales=(1 / 4, 1 / 16)),
        dict(scales=(1 / 3,)),
        dict(scales=(2.0,)),
        dict(scales=(1 / 4, 0.0)),
        dict(canonical_box_size=0),
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        _pooler(**kwargs)


@pytest.mark.parametrize("scales", [SCALES, (1 / 4,)])
def test_non_finite_boxes_give_zero_rows(scales):
    # torchvision's result for them is undefined (NaN or garbage); here they are dropped rows.
    features, boxes = _features()[: len(scales)], _boxes(nan=False)
    pooler = _pooler(scales=scales)
    ref = pooler(features, boxes)
    boxes[0, 20, 2], boxes[1, 21] = float("inf"), float("-inf")
    boxes[0, 22, 1] = float("nan")
    out = pooler(features, boxes)
    dropped = torch.zeros(80, dtype=torch.bool)
    dropped[[20, 22, 61]] = True
    assert not out[dropped].any() and torch.equal(out[~dropped], ref[~dropped])


def test_no_boxes():
    out = _pooler()(_features(), torch.zeros(2, 0, 4))
    assert out.shape == _reference(_features(), torch.zeros(2, 0, 4)).shape == (0, CHANNELS, 7, 7)


def test_bad_inputs_raise():
    pooler, features = _pooler(), _features()
    with pytest.raises(ValueError):
        pooler(features[:3], _boxes())
    with pytest.raises(ValueError):
        pooler(features, _boxes()[0])
    with pytest.raises(ValueError):
        pooler(features, _boxes()[:1])
