"""DynamicHead: official-checkpoint parity, state-dict layout, initialisation and robustness.

Shape legend: B images, N proposals, S stages, K classes, D hidden_dim.
Boxes are abs xyxy.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling.box_regression import Box2BoxTransform

from diffusiondet.modeling.acceleration import set_head_speed_options
from diffusiondet.modeling.head import (
    DynamicHead,
    RefinementStage,
    SinusoidalTimeEmbedding,
    build_time_mlp,
)

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # p2..p5, as in the fixture's meta["pooler"]


def _head_from_meta(meta, **overrides):
    kwargs = dict(
        num_classes=meta["num_classes"],
        in_channels=meta["hidden_dim"],
        hidden_dim=meta["hidden_dim"],
        dim_feedforward=meta["dim_feedforward"],
        nhead=meta["nheads"],
        num_stages=meta["num_stages"],
        num_cls=meta["num_cls"],
        num_reg=meta["num_reg"],
        dim_dynamic=meta["dim_dynamic"],
        pooler_resolution=7,
        sampling_ratio=2,
        pooler_type="ROIAlignV2",
        pooler_scales=SCALES,
    )
    kwargs.update(overrides)
    return DynamicHead(**kwargs)


def _official_head(parity):
    head = _head_from_meta(parity["meta"])
    state = {k[len("head.") :]: v for k, v in parity["head_state_dict"].items()}
    head.load_state_dict(state, strict=True)  # no renaming: names are the official ones
    return head.eval()


def _small_head(**overrides):
    kwargs = dict(
        num_classes=3, in_channels=16, hidden_dim=16, dim_feedforward=32, nhead=2,
        num_stages=3, dim_dynamic=4, pooler_scales=SCALES,
    )  # fmt: skip
    kwargs.update(overrides)
    return DynamicHead(**kwargs).eval()


def _features(batch, channels=16, height=32, width=48):
    return [torch.randn(batch, channels, height >> i, width >> i) for i in range(4)]


def _random_boxes(batch, num, width=192.0, height=128.0):
    xy = torch.rand(batch, num, 2) * torch.tensor([width, height])
    wh = torch.rand(batch, num, 2) * 60 + 2
    return torch.cat([xy, xy + wh], dim=-1)


def _scaled_box_error(pred, ref, inputs):
    # Decoding multiplies delta noise by the box size (up to e^8.74·w), so compare coordinates
    # relative to the largest coordinate of the input or reference box.
    scale = torch.cat([inputs.abs(), ref.abs()], dim=-1).amax(-1, keepdim=True).clamp(min=1)
    return ((pred - ref).abs() / scale).max().item()


@torch.no_grad()
def test_official_parity(parity):
    print(parity["meta"])
    head = _official_head(parity)
    features, t = parity["features"], parity["train_t"]
    noisy_boxes = parity["train_noisy_boxes"]
    ref_logits, ref_boxes = parity["train_head_logits"], parity["train_head_boxes"]

    out = head(features, noisy_boxes, t)
    assert out["pred_logits"].shape == ref_logits.shape == (6, 2, 50, 5)
    assert out["pred_boxes"].shape == ref_boxes.shape == (6, 2, 50, 4)
    assert out["obj_features"].shape == (6, 2, 50, 64)
    # Free running, stage 0 is directly comparable.
    assert (out["pred_logits"][0] - ref_logits[0]).abs().max() <= 1e-4
    assert _scaled_box_error(out["pred_boxes"][0], ref_boxes[0], noisy_boxes) <= 1e-4

    # Later stages: feed each stage the official boxes of the previous one (object features
    # still chain through our own stages), since free-running boxes amplify float32 rounding
    # chaotically (see the next test).
    time_emb = head.time_mlp(t)
    boxes, pro_features = noisy_boxes.float(), None
    for s, stage in enumerate(head.head_series):
        roi_features = head.pool(features, boxes)
        stage_out = stage(roi_features, boxes, pro_features, time_emb)
        logits, pred_boxes = stage_out["pred_logits"], stage_out["pred_boxes"]
        pro_features = stage_out["obj_features"]
        assert (logits - ref_logits[s]).abs().max() <= 1e-4, f"stage {s} logits"
        assert _scaled_box_error(pred_boxes, ref_boxes[s], boxes) <= 1e-4, f"stage {s} boxes"
        if s == 0:
            torch.testing.assert_close(pred_boxes, out["pred_boxes"][0], atol=0, rtol=0)
        boxes = ref_boxes[s]


@torch.no_grad()
def test_free_running_stages_amplify_float_noise(parity):
    # Why the parity test teacher-forces boxes: with the fixture's weights, a 1e-7 relative
    # change of the input boxes (float32 rounding level) already moves the last stage's logits
    # by far more than 1e-4, so no float32 implementation can match free-running stages 2..5
    # unless it reproduces the official kernels' rounding bit for bit.
    head = _official_head(parity)
    features, t, boxes = parity["features"], parity["train_t"], parity["train_noisy_boxes"]
    base = head(features, boxes, t)["pred_logits"]
    nudged = head(features, (boxes.double() * (1 + 1e-7)).float(), t)["pred_logits"]
    change = (base - nudged).abs().amax(dim=(1, 2, 3))
    assert change[0] < 1e-4 and change[-1] > 1e-2


def test_state_dict_layout_and_parameter_counts_at_coco_size():
    head = DynamicHead(num_classes=80, in_channels=256, pooler_scales=SCALES)
    state = head.state_dict()
    stage_keys = [k[len("head_series.0.") :] for k in state if k.startswith("head_series.0.")]
    assert len(stage_keys) == 42
    assert len(state) == 6 * 42 + 4
    assert sorted(k for k in state if not k.startswith("head_series.")) == [
        "time_mlp.1.bias", "time_mlp.1.weight", "time_mlp.3.bias", "time_mlp.3.weight",
    ]  # fmt: skip
    expected_shapes = {
        "self_attn.in_proj_weight": (768, 256),
        "inst_interact.dynamic_layer.weight": (32768, 256),
        "inst_interact.norm1.weight": (64,),
        "inst_interact.out_layer.weight": (256, 12544),
        "linear1.weight": (2048, 256),
        "block_time_mlp.1.weight": (512, 1024),
        "cls_module.0.weight": (256, 256),
        "cls_module.1.bias": (256,),
        "reg_module.6.weight": (256, 256),
        "reg_module.7.bias": (256,),
        "class_logits.weight": (80, 256),
        "bboxes_delta.bias": (4,),
    }
    for suffix, shape in expected_shapes.items():
        assert tuple(state[f"head_series.5.{suffix}"].shape) == shape, suffix
    assert "cls_module.0.bias" not in stage_keys  # bias-free tower Linears
    per_stage = sum(p.numel() for p in head.head_series[0].parameters())
    assert per_stage == 13_760_212
    assert sum(p.numel() for p in head.time_mlp.parameters()) == 1_312_768
    assert sum(p.numel() for p in head.parameters()) == 83_874_040


def test_initialisation_targets_only_the_classifier_bias():
    prior = -math.log((1 - 0.01) / 0.01)
    head = _small_head(num_classes=4, num_stages=2)  # K = 4 = bboxes_delta.bias length
    for stage in head.head_series:
        assert torch.allclose(stage.class_logits.bias, torch.full((4,), prior))
        assert not torch.allclose(stage.bboxes_delta.bias, torch.full((4,), prior))
    # K = 64 = dim_dynamic: the official rule would overwrite inst_interact.norm1.
    head = _small_head(num_classes=64, dim_dynamic=64, num_stages=2)
    for stage in head.head_series:
        assert torch.equal(stage.inst_interact.norm1.weight, torch.ones(64))
        assert torch.equal(stage.inst_interact.norm1.bias, torch.zeros(64))
    softmax_head = _small_head(use_focal=False)
    assert softmax_head.head_series[0].class_logits.out_features == 4  # K + 1
    assert not torch.allclose(softmax_head.head_series[0].class_logits.bias, torch.tensor(prior))


def test_initialisation_is_xavier_and_identical_across_stages():
    head = _small_head(num_stages=3)
    first = head.head_series[0].state_dict()
    for stage in head.head_series[1:]:
        for name, value in stage.state_dict().items():
            assert torch.equal(value, first[name]), name
    # Xavier-uniform has std sqrt(2 / (fan_in + fan_out)); PyTorch's Linear default does not.
    for name, param in [("out_layer", head.head_series[0].inst_interact.out_layer.weight),
                        ("time_mlp.3", head.time_mlp[3].weight)]:  # fmt: skip
        fan_out, fan_in = param.shape
        expected = math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(param.std().item() / expected - 1) < 0.1, name


@torch.no_grad()
def test_batch_equals_single_images():
    # float64: in float32 the GEMMs round differently for 1 and 2 images and a random head
    # amplifies that over stages; in float64 any cross-image leak would still show as O(1).
    head = _small_head().double()
    features = [f.double() for f in _features(2)]
    boxes = _random_boxes(2, 7)
    t = torch.tensor([10, 900])
    batched = head(features, boxes, t)
    for i in range(2):
        single = head([f[i : i + 1] for f in features], boxes[i : i + 1], t[i : i + 1])
        for key in ("pred_logits", "pred_boxes", "obj_features"):
            torch.testing.assert_close(single[key][:, 0], batched[key][:, i], atol=1e-9, rtol=0)


@torch.no_grad()
def test_outputs_shapes_dtypes_and_deep_supervision_switch():
    head = _small_head(num_stages=3)
    features, t = _features(2), torch.tensor([3, 500])
    boxes = _random_boxes(2, 5)
    out = head(features, boxes.double(), t)  # float64 boxes are cast
    assert out["pred_logits"].shape == (3, 2, 5, 3)
    assert out["pred_boxes"].shape == (3, 2, 5, 4)
    assert out["obj_features"].shape == (3, 2, 5, 16)
    assert out["pred_logits"].dtype == out["pred_boxes"].dtype == torch.float32
    torch.testing.assert_close(head(features, boxes, t)["pred_boxes"], out["pred_boxes"])

    last_only = _small_head(num_stages=3, deep_supervision=False)
    last_only.load_state_dict(head.state_dict())
    out_last = last_only(features, boxes, t)
    for key in ("pred_logits", "pred_boxes", "obj_features"):
        assert out_last[key].shape[0] == 1
        torch.testing.assert_close(out_last[key][0], out[key][-1])

    one = head(_features(1), _random_boxes(1, 1), torch.tensor([0]))
    assert one["pred_boxes"].shape == (3, 1, 1, 4)


@torch.no_grad()
def test_time_modulates_predictions_but_not_object_features():
    head = _small_head()
    features, boxes = _features(1), _random_boxes(1, 6)
    early = head(features, boxes, torch.tensor([0]))
    late = head(features, boxes, torch.tensor([999]))
    torch.testing.assert_close(early["obj_features"][0], late["obj_features"][0])
    assert not torch.allclose(early["pred_logits"][0], late["pred_logits"][0])


def test_boxes_are_detached_between_stages():
    head = _small_head(num_stages=2).train()
    out = head(_features(1), _random_boxes(1, 4), torch.tensor([5]))
    out["pred_boxes"][1].sum().backward()
    # Stage 0's box regressor can only reach stage 1 through the (detached) boxes.
    stage0_grad = head.head_series[0].bboxes_delta.weight.grad
    assert stage0_grad is None or not stage0_grad.any()
    assert head.head_series[1].bboxes_delta.weight.grad.abs().sum() > 0
    assert head.head_series[0].linear1.weight.grad.abs().sum() > 0  # features do chain


@torch.no_grad()
def test_degenerate_and_huge_boxes_give_finite_outputs():
    head = _small_head()
    boxes = torch.tensor(
        [[
            [10.0, 10.0, 10.0, 40.0],  # zero width
            [5.0, 5.0, 5.0, 5.0],  # a point
            [-500.0, -400.0, -300.0, -200.0],  # outside the image
            [1000.0, 900.0, 2000.0, 1500.0],  # outside on the other side
            [-1e6, -1e6, 1e6, 1e6],  # huge
            [30.0, 30.0, 20.0, 20.0],  # inverted
        ]]
    )  # fmt: skip
    out = head(_features(1), boxes, torch.tensor([999]))
    for key, value in out.items():
        assert torch.isfinite(value).all(), key


def test_sinusoidal_time_embedding_formula_and_mlp_names():
    emb = SinusoidalTimeEmbedding(8)
    t = torch.tensor([0, 1, 999])
    out = emb(t)
    half = 4
    for row, step in enumerate(t.tolist()):
        for k in range(half):
            omega = math.exp(-k * math.log(10000.0) / (half - 1))
            assert out[row, k].item() == pytest.approx(math.sin(step * omega), abs=1e-4)
            assert out[row, half + k].item() == pytest.approx(math.cos(step * omega), abs=1e-4)
    assert emb.double()(t).dtype == torch.float64
    mlp = build_time_mlp(8)
    assert [k for k in mlp.state_dict()] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert mlp(t).shape == (3, 32)


@pytest.mark.parametrize("activation", ["gelu", "glu"])
def test_other_activations_run(activation):
    function = {"gelu": F.gelu, "glu": F.glu}[activation]
    head = _small_head(activation=activation, num_stages=1)
    stage = head.head_series[0]
    seen = {}
    stage.linear1.register_forward_hook(lambda module, args, out: seen.update(before=out))
    stage.linear2.register_forward_pre_hook(lambda module, args: seen.update(after=args[0]))
    features, boxes, t = _features(1), _random_boxes(1, 3), torch.tensor([1])
    out = head(features, boxes, t)
    assert out["pred_logits"].shape == (1, 1, 3, 3)
    # The FFN applies exactly this function to linear1's output (dropout is 0); glu halves it.
    assert torch.equal(seen["after"], function(seen["before"]))
    # Relu at the width linear2 takes, on the same weights, changes the predictions.
    width = seen["after"].shape[-1]
    stage.activation = lambda x: F.relu(x[..., :width])
    relu_out = head(features, boxes, t)
    assert not torch.allclose(relu_out["pred_logits"], out["pred_logits"], atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(in_channels=32), "in_channels"),
        (dict(num_dynamic=3), "num_dynamic"),
        (dict(activation="tanh"), "activation"),
        (dict(num_stages=0), "num_stages"),
    ],
)
def test_invalid_arguments_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        _small_head(**overrides)


# --- defaults, settings reaching every stage, time-embedding dtype (found by mutation testing)
# Each test below builds what it checks itself (no module fixture): mutmut credits a function
# only to the tests that call it.


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


def _two_stage_head(**kwargs):
    args = dict(num_classes=3, in_channels=16, hidden_dim=16, dim_feedforward=32, nhead=2,
                num_stages=2, dim_dynamic=4, pooler_scales=SCALES)
    return DynamicHead(**{**args, **kwargs})


def test_dynamic_head_passes_its_settings_to_every_stage():
    head = _two_stage_head(dropout=0.2, activation="gelu", num_cls=2, num_reg=1, bbox_weights=(1.0, 1.0, 3.0, 3.0))
    assert head.num_classes == 3 and head.hidden_dim == 16
    for stage in head.head_series:
        assert stage.dropout.p == 0.2 and stage.activation is torch.nn.functional.gelu
        assert len(stage.cls_module) == 6 and len(stage.reg_module) == 3
        assert stage.box2box_transform.weights == (1.0, 1.0, 3.0, 3.0)
    default = _two_stage_head()
    assert default.head_series[0].inst_interact.chunk_size == 0
    assert default.box_pooler.num_threads == 0
    with pytest.raises(ValueError, match=r"^in_channels \(8\) must equal hidden_dim \(16\): RoI features "
                                         r"are used directly as object features$"):
        _two_stage_head(in_channels=8)


def test_speed_options_accept_automatic_values_and_reach_every_stage():
    head = _two_stage_head()
    set_head_speed_options(head, dynamic_chunk_size=5, pooler_threads=0)
    assert [s.inst_interact.chunk_size for s in head.head_series] == [5, 5]
    assert head.box_pooler.num_threads == 0
    set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=3)
    assert head.box_pooler.num_threads == 3
    with pytest.raises(ValueError, match=r"^dynamic_chunk_size and pooler_threads must be >= 0, got 0 and -1$"):
        set_head_speed_options(head, dynamic_chunk_size=0, pooler_threads=-1)
