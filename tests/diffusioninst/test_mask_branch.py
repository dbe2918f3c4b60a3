"""aligned_bilinear on hand-derived cases; mask refine/tower layout; mask-branch wiring."""
import pytest
import torch
from torch import nn

from diffusioninst.modeling.mask_branch import (
    aligned_bilinear,
    build_mask_refine,
    build_mask_tower,
    mask_branch_forward,
)


def test_aligned_bilinear_factor_one_is_identity():
    x = torch.randn(2, 3, 4, 5)
    assert aligned_bilinear(x, 1) is x


def test_aligned_bilinear_constant_stays_constant():
    x = torch.full((1, 2, 3, 5), 0.7)
    out = aligned_bilinear(x, 4)
    assert out.shape == (1, 2, 12, 20)
    torch.testing.assert_close(out, torch.full_like(out, 0.7))


def test_aligned_bilinear_factor_two_ramp_by_hand():
    # x = [[0,1,2],[3,4,5]] = row offset 3·r + column value c.
    # 1) replicate right/bottom -> columns [0,1,2,2], rows offsets [0,3,3]
    # 2) align_corners resize 4->7 cols samples at c/2: [0,.5,1,1.5,2,2,2]; 3->5 rows: [0,1.5,3,3,3]
    # 3) replicate 1 left/top: cols [0,0,.5,1,1.5,2,2,2], rows [0,0,1.5,3,3,3]
    # 4) crop to 4×6: cols [0,0,.5,1,1.5,2], rows [0,0,1.5,3]
    x = torch.tensor([[0.0, 1, 2], [3, 4, 5]])[None, None]
    cols = torch.tensor([0.0, 0, 0.5, 1, 1.5, 2])
    rows = torch.tensor([0.0, 0, 1.5, 3])
    want = rows[:, None] + cols[None, :]
    torch.testing.assert_close(aligned_bilinear(x, 2)[0, 0], want)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_aligned_bilinear_input_lands_on_cell_centres(factor):
    # input pixel (i, j) reappears exactly at output (f·i + f//2, f·j + f//2)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    out = aligned_bilinear(x, factor)
    assert out.shape == (2, 3, 5 * factor, 7 * factor)
    start = factor // 2
    torch.testing.assert_close(out[:, :, start::factor, start::factor], x)


@pytest.mark.parametrize("factor", [0, -2, 2.0, True])
def test_aligned_bilinear_rejects_bad_factor(factor):
    with pytest.raises(ValueError, match="positive int"):
        aligned_bilinear(torch.zeros(1, 1, 2, 2), factor)


def test_refine_and_tower_state_dict_keys_official_layout():
    refine = build_mask_refine(256, 128, 3)
    tower = build_mask_tower(128, 4, 8)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    want_refine = {f"{i}.0.weight" for i in range(3)} | {f"{i}.1.{b}" for i in range(3) for b in bn}
    assert set(refine.state_dict()) == want_refine
    want_tower = {f"{j}.0.weight" for j in range(4)} | {f"{j}.1.{b}" for j in range(4) for b in bn}
    assert set(tower.state_dict()) == want_tower | {"4.weight", "4.bias"}
    assert refine[0][0].weight.shape == (128, 256, 3, 3)
    assert tower[3][0].weight.shape == (128, 128, 3, 3)
    assert tower[4].weight.shape == (8, 128, 1, 1)
    assert isinstance(refine[2][1], nn.BatchNorm2d) and isinstance(refine[2][2], nn.ReLU)


def test_refine_without_norm_has_conv_bias_and_gn_works():
    plain = build_mask_refine(16, 32, 2, norm="")
    assert set(plain.state_dict()) == {"0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias"}
    tower = build_mask_tower(32, 2, 8, norm="GN")
    assert isinstance(tower[0][1], nn.GroupNorm) and tower[0][0].bias is None
    assert tower(torch.randn(1, 32, 5, 6)).shape == (1, 8, 5, 6)


def _features(batch=2, channels=16):
    # non-square pyramid for a 96×128 padded image: p2..p5 at strides 4, 8, 16, 32
    sizes = [(24, 32), (12, 16), (6, 8), (3, 4)]
    return [torch.randn(batch, channels, h, w) for h, w in sizes]


def _branch(channels=16):
    refine = build_mask_refine(channels, 12, 3).eval()
    tower = build_mask_tower(12, 2, 8).eval()
    # non-trivial BN statistics so the eval-mode norm is not an identity
    for module in list(refine.modules()) + list(tower.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return refine, tower


def test_mask_branch_shape_stride_and_sum():
    refine, tower = _branch()
    feats = _features()
    with torch.no_grad():
        out = mask_branch_forward(refine, tower, feats, [4, 8, 16, 32])
        assert out.shape == (2, 8, 24, 32)  # finest level's stride
        base = (
            refine[0](feats[0])
            + aligned_bilinear(refine[1](feats[1]), 2)
            + aligned_bilinear(refine[2](feats[2]), 4)
        )
        torch.testing.assert_close(out, tower(base))


def test_mask_branch_ignores_p5():
    refine, tower = _branch()
    feats = _features()
    with torch.no_grad():
        with_p5 = mask_branch_forward(refine, tower, feats, [4, 8, 16, 32])
        other_feats = feats[:3] + [torch.randn(2, 16, 3, 4)]
        other_p5 = mask_branch_forward(refine, tower, other_feats, [4, 8, 16, 32])
        without = mask_branch_forward(refine, tower, feats[:3], [4, 8, 16])
    assert torch.equal(with_p5, other_p5) and torch.equal(with_p5, without)


def test_mask_branch_each_level_contributes():
    refine, tower = _branch()
    feats = _features()
    with torch.no_grad():
        ref = mask_branch_forward(refine, tower, feats, [4, 8, 16, 32])
        for level in range(3):
            changed = list(feats)
            changed[level] = torch.randn_like(feats[level])
            out = mask_branch_forward(refine, tower, changed, [4, 8, 16, 32])
            assert not torch.allclose(ref, out)


def test_mask_branch_factor_comes_from_strides():
    # strides 2 and 6: the coarse level is upsampled ×3 (not ×2 as for a standard pyramid)
    refine = build_mask_refine(4, 6, 2).eval()
    tower = build_mask_tower(6, 1, 8).eval()
    feats = [torch.randn(1, 4, 9, 12), torch.randn(1, 4, 3, 4)]
    with torch.no_grad():
        out = mask_branch_forward(refine, tower, feats, [2, 6])
        want = tower(refine[0](feats[0]) + aligned_bilinear(refine[1](feats[1]), 3))
    torch.testing.assert_close(out, want)


def test_mask_branch_errors():
    refine, tower = _branch()
    feats = _features()
    with pytest.raises(ValueError, match="not a multiple"):
        mask_branch_forward(refine, tower, feats, [4, 6, 16, 32])
    bad = [feats[0], torch.randn(2, 16, 12, 15), feats[2]]
    with pytest.raises(ValueError, match="upsampled"):
        mask_branch_forward(refine, tower, bad, [4, 8, 16])
    with pytest.raises(ValueError, match="needs 3 levels"):
        mask_branch_forward(refine, tower, feats[:2], [4, 8])
