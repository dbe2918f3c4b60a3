"""Dynamic mask head: filter counts, parameter layout, grouped conv vs explicit matmuls."""
import pytest
import torch

from diffusioninst.modeling.dynamic_mask_head import (
    DynamicMaskHeadSpec,
    dynamic_mask_logits,
    split_mask_params,
)

# (in_channels, channels) -> (weight_nums, bias_nums, num_params), all worked out by hand.
HAND_COUNTS = [
    # official: 8·8 + 8·8 + 8·1 = 136 weights, 8 + 8 + 1 = 17 biases
    ((8, (8, 8, 1)), ([64, 64, 8], [8, 8, 1], 153)),
    # 8·16 + 16·1 = 144 weights, 16 + 1 = 17 biases
    ((8, (16, 1)), ([128, 16], [16, 1], 161)),
    # 3·64 + 8 = 200 weights, 8·3 + 1 = 25 biases
    ((8, (8, 8, 8, 1)), ([64, 64, 64, 8], [8, 8, 8, 1], 225)),
    # a single 8→1 layer: 8 weights, 1 bias
    ((8, (1,)), ([8], [1], 9)),
    # CondInst's 8 + 2 coordinate channels: 80 + 64 + 8 = 152, + 17 = 169 (CondInst's count)
    ((10, (8, 8, 1)), ([80, 64, 8], [8, 8, 1], 169)),
]


@pytest.mark.parametrize("args, expected", HAND_COUNTS)
def test_filter_counts(args, expected):
    spec = DynamicMaskHeadSpec(in_channels=args[0], channels=args[1])
    weight_nums, bias_nums, num_params = expected
    assert spec.weight_nums == weight_nums
    assert spec.bias_nums == bias_nums
    assert spec.num_params == num_params
    assert spec.num_layers == len(args[1])


def test_default_spec_is_official():
    spec = DynamicMaskHeadSpec()
    assert (spec.in_channels, spec.channels, spec.num_params) == (8, (8, 8, 1), 153)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": (8, 8, 2)}, "last layer must output 1"),
        ({"channels": ()}, "at least one layer"),
        ({"channels": (8, 0, 1)}, "positive int"),
        ({"in_channels": 0}, "in_channels"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicMaskHeadSpec(**kwargs)


def test_split_order_official_layout():
    # Official layout: W1 [0:64], W2 [64:128], W3 [128:136], b1 [136:144], b2 [144:152], b3 [152]
    params = torch.arange(153.0).reshape(1, 153).repeat(2, 1)
    params[1] += 1000
    weights, biases = split_mask_params(params, DynamicMaskHeadSpec())
    assert [tuple(w.shape) for w in weights] == [(2, 8, 8), (2, 8, 8), (2, 1, 8)]
    assert [tuple(b.shape) for b in biases] == [(2, 8), (2, 8), (2, 1)]
    # out-major: W1[o, i] is element o·8 + i
    assert weights[0][0, 2, 5] == 2 * 8 + 5
    assert torch.equal(weights[0][0], torch.arange(0.0, 64).reshape(8, 8))
    assert torch.equal(weights[1][0], torch.arange(64.0, 128).reshape(8, 8))
    assert torch.equal(weights[2][0], torch.arange(128.0, 136).reshape(1, 8))
    assert torch.equal(biases[0][0], torch.arange(136.0, 144))
    assert torch.equal(biases[1][0], torch.arange(144.0, 152))
    assert torch.equal(biases[2][0], torch.tensor([152.0]))
    assert torch.equal(weights[1][1], torch.arange(1064.0, 1128).reshape(8, 8))


def test_split_order_other_spec():
    # in 3, channels (2, 1): W1 2×3 [0:6], W2 1×2 [6:8], b1 [8:10], b2 [10]
    spec = DynamicMaskHeadSpec(in_channels=3, channels=(2, 1))
    weights, biases = split_mask_params(torch.arange(11.0)[None], spec)
    assert torch.equal(weights[0][0], torch.tensor([[0.0, 1, 2], [3, 4, 5]]))
    assert torch.equal(weights[1][0], torch.tensor([[6.0, 7]]))
    assert torch.equal(biases[0][0], torch.tensor([8.0, 9]))
    assert torch.equal(biases[1][0], torch.tensor([10.0]))


def _reference_logits(mask_feat, params, image_index, in_channels, channels, relu=True):
    """Independent per-instance loop: slice offsets recomputed here, layers as explicit matmuls."""
    outs = []
    height, width = mask_feat.shape[-2:]
    widths = [in_channels, *channels]
    for m in range(params.shape[0]):
        vec = params[m]
        offset = 0
        mats = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            mats.append(vec[offset : offset + cin * cout].reshape(cout, cin))
            offset += cin * cout
        vecs = []
        for cout in channels:
            vecs.append(vec[offset : offset + cout])
            offset += cout
        assert offset == vec.numel()
        x = mask_feat[int(image_index[m])].reshape(in_channels, height * width)
        for layer, (w, b) in enumerate(zip(mats, vecs)):
            x = w @ x + b[:, None]
            if relu and layer < len(channels) - 1:
                x = x.clamp(min=0)
        outs.append(x.reshape(height, width))
    return torch.stack(outs)


@pytest.mark.parametrize("in_channels, channels", [(8, (8, 8, 1)), (5, (16, 1)), (8, (1,))])
def test_grouped_conv_matches_per_instance_matmuls(in_channels, channels):
    spec = DynamicMaskHeadSpec(in_channels=in_channels, channels=channels)
    mask_feat = torch.randn(3, in_channels, 7, 11, dtype=torch.float64)
    # instances spread over the images unevenly and out of order; image 1 has none
    image_index = torch.tensor([2, 0, 2, 0, 0, 2, 2])
    params = torch.randn(len(image_index), spec.num_params, dtype=torch.float64)
    got = dynamic_mask_logits(mask_feat, params, image_index, spec)
    want = _reference_logits(mask_feat, params, image_index, in_channels, channels)
    assert got.shape == (7, 7, 11)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if len(channels) > 1:  # the data is such that a missing ReLU would be caught
        linear = _reference_logits(mask_feat, params, image_index, in_channels, channels, False)
        assert (linear - want).abs().max() > 1e-3


def test_single_instance_and_gradients():
    spec = DynamicMaskHeadSpec()
    mask_feat = torch.randn(2, 8, 4, 6, dtype=torch.float64, requires_grad=True)
    params = torch.randn(1, 153, dtype=torch.float64, requires_grad=True)
    image_index = torch.tensor([1])
    got = dynamic_mask_logits(mask_feat, params, image_index, spec)
    want = _reference_logits(mask_feat, params, image_index, 8, (8, 8, 1))
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert params.grad.abs().sum() > 0
    assert mask_feat.grad[0].abs().sum() == 0 and mask_feat.grad[1].abs().sum() > 0


def test_zero_instances():
    spec = DynamicMaskHeadSpec()
    out = dynamic_mask_logits(
        torch.randn(2, 8, 5, 9), torch.zeros(0, 153), torch.zeros(0, dtype=torch.long), spec
    )
    assert out.shape == (0, 5, 9)


def test_validation_errors():
    spec = DynamicMaskHeadSpec()
    two = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs 153"):
        dynamic_mask_logits(torch.randn(1, 8, 4, 4), torch.randn(2, 169), two, spec)
    with pytest.raises(ValueError, match="10 channels"):
        dynamic_mask_logits(torch.randn(1, 10, 4, 4), torch.randn(2, 153), two, spec)
    with pytest.raises(ValueError, match="image_index"):
        dynamic_mask_logits(torch.randn(1, 8, 4, 4), torch.randn(2, 153), two[:1], spec)


@pytest.mark.numerics
def test_equals_one_grouped_1x1_convolution():
    # The official formulation: instance features tiled along channels, one F.conv2d with
    # groups = M per layer. Same arithmetic per output (a C_in-term dot product), different
    # kernels, so equal to float32 rounding.
    import torch.nn.functional as F

    from diffusioninst.modeling.dynamic_mask_head import split_mask_params

    gen = torch.Generator().manual_seed(3)
    spec = DynamicMaskHeadSpec()
    mask_feat = torch.randn(3, 8, 7, 11, generator=gen)
    params = torch.randn(9, spec.num_params, generator=gen)
    image_index = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 2])
    weights, biases = split_mask_params(params, spec)
    x = mask_feat[image_index].reshape(1, 9 * 8, 7, 11)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w.reshape(-1, w.shape[2], 1, 1), b.reshape(-1), groups=9)
        x = F.relu(x) if layer < spec.num_layers - 1 else x
    ours = dynamic_mask_logits(mask_feat, params, image_index, spec)
    torch.testing.assert_close(ours, x.reshape(9, 7, 11), atol=1e-5, rtol=1e-5)


def test_relative_coordinates_by_hand():
    from diffusioninst.modeling.dynamic_mask_head import relative_coordinates

    # Box (8, 4)-(24, 28): centre (16, 16), size 16 x 24. Stride 4: pixel (i, j) sits at
    # (x, y) = (2 + 4j, 2 + 4i). A degenerate box's sides are floored at the stride.
    boxes = torch.tensor([[8.0, 4.0, 24.0, 28.0], [10.0, 10.0, 10.0, 11.0]])
    rel = relative_coordinates(boxes, height=5, width=7, stride=4)  # (2, 2, 35)
    assert rel.shape == (2, 2, 35)
    rel = rel.reshape(2, 2, 5, 7)
    # pixel (i=3, j=1) at (6, 14): ((6 - 16) / 16, (14 - 16) / 24)
    torch.testing.assert_close(rel[0, :, 3, 1], torch.tensor([-10 / 16, -2 / 24]))
    # pixel (i=0, j=6) at (26, 2): ((26 - 16) / 16, (2 - 16) / 24)
    torch.testing.assert_close(rel[0, :, 0, 6], torch.tensor([10 / 16, -14 / 24]))
    # centre (10, 10.5), size floored to (4, 4); pixel (i=2, j=2) at (10, 10)
    torch.testing.assert_close(rel[1, :, 2, 2], torch.tensor([0.0, -0.5 / 4]))


def test_relative_coordinates_tell_alike_instances_apart():
    # Two instances with the same filter on the same image: without coordinates their masks
    # are equal; with them each mask is the reference head run on [x_rel, y_rel, features].
    spec = DynamicMaskHeadSpec(in_channels=8, channels=(8, 8, 1), rel_coords=True)
    assert spec.num_params == 169 and spec.layer_in_channels == [10, 8, 8]
    gen = torch.Generator().manual_seed(5)
    mask_feat = torch.randn(2, 8, 6, 10, generator=gen, dtype=torch.float64)
    params = torch.randn(1, 169, generator=gen, dtype=torch.float64).repeat(3, 1)
    image_index = torch.tensor([1, 1, 0])
    boxes = torch.tensor([[0.0, 0.0, 12.0, 8.0], [20.0, 8.0, 40.0, 24.0], [0.0, 0.0, 12.0, 8.0]],
                         dtype=torch.float64)
    got = dynamic_mask_logits(mask_feat, params, image_index, spec, boxes, 4)
    assert (got[0] - got[1]).abs().max() > 1e-3
    from diffusioninst.modeling.dynamic_mask_head import relative_coordinates

    rel = relative_coordinates(boxes, 6, 10, 4).reshape(3, 2, 6, 10)
    with_coords = torch.stack([torch.cat([rel[m], mask_feat[int(i)]]) for m, i in enumerate(image_index)])
    want = torch.stack([
        _reference_logits(with_coords[m:m + 1], params[m:m + 1], torch.tensor([0]), 10, (8, 8, 1))[0]
        for m in range(3)
    ])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the boxes place the coordinates only: no gradient reaches them
    boxes.requires_grad_(True)
    params.requires_grad_(True)
    dynamic_mask_logits(mask_feat, params, image_index, spec, boxes, 4).sum().backward()
    assert boxes.grad is None and params.grad.abs().sum() > 0


def test_relative_coordinates_need_boxes():
    spec = DynamicMaskHeadSpec(rel_coords=True)
    two = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs \\(M, 4\\) = \\(2, 4\\) boxes"):
        dynamic_mask_logits(torch.randn(1, 8, 4, 4), torch.randn(2, 169), two, spec)
    with pytest.raises(ValueError, match="boxes \\(1, 4\\)"):
        dynamic_mask_logits(torch.randn(1, 8, 4, 4), torch.randn(2, 169), two, spec, torch.zeros(1, 4), 4)


def test_mask_feature_gradient_is_the_same_every_time():
    # Many instances share each image's mask feature: their gradients are summed into it. The
    # sum must run in the same order every time (advanced indexing's backward did not on CPU,
    # and two identical DiffusionInst trainings drifted apart), so that training is bit-exact.
    spec = DynamicMaskHeadSpec()
    gen = torch.Generator().manual_seed(11)
    mask_feat = torch.randn(4, 8, 40, 48, generator=gen, requires_grad=True)
    image_index = torch.randint(0, 4, (400,), generator=gen)
    params = torch.randn(400, spec.num_params, generator=gen)
    upstream = torch.randn(400, 40, 48, generator=gen)
    grads = []
    for _ in range(8):
        mask_feat.grad = None
        dynamic_mask_logits(mask_feat, params, image_index, spec).backward(upstream)
        grads.append(mask_feat.grad.clone())
    assert all(torch.equal(grads[0], g) for g in grads[1:])
