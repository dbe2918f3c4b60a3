"""Dice loss and GT-mask sub-sampling on hand-derived cases."""
import math

import pytest
import torch

from diffusioninst.modeling.mask_losses import dice_loss_per_mask, masks_at_stride


def test_dice_perfect_prediction_is_zero():
    target = torch.zeros(1, 5, 7)
    target[0, 1:4, 2:6] = 1
    logits = (target * 2 - 1) * 30  # sigmoid ≈ 1 on the mask, ≈ 1e-13 off it
    # d = 1 − 2·12 / (12 + 12 + 1e-5) ≈ 4e-7
    loss = dice_loss_per_mask(logits, target)
    assert loss.shape == (1,)
    assert 0 <= loss.item() < 1e-6


def test_dice_disjoint_is_one():
    target = torch.zeros(1, 4, 6)
    target[0, :, :3] = 1
    logits = torch.full((1, 4, 6), -30.0)
    logits[0, :, 3:] = 30
    torch.testing.assert_close(dice_loss_per_mask(logits, target), torch.ones(1))


def test_dice_two_by_two_by_hand():
    # p = [[.5, .75], [.25, .5]], g = [[1, 1], [0, 0]]
    # Σpg = 1.25, Σp² = .25 + .5625 + .0625 + .25 = 1.125, Σg² = 2
    # d = 1 − 2.5 / (3.125 + 1e-5); with Σp instead of Σp² it would be 1 − 2.5/4 = 0.375
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, ln3], [-ln3, 0.0]]], dtype=torch.float64)
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    want = 1 - 2.5 / (3.125 + 1e-5)
    got = dice_loss_per_mask(logits, target)
    assert abs(got.item() - want) < 1e-12


def test_dice_is_per_mask_and_eps_handles_empty():
    logits = torch.stack([torch.full((3, 4), -40.0), torch.zeros(3, 4)])
    targets = torch.stack([torch.zeros(3, 4), torch.ones(3, 4)])
    got = dice_loss_per_mask(logits, targets)
    # empty vs empty: 1 − 0/eps = 1;  p = .5 everywhere vs all ones: 1 − 2·6/(3 + 12 + 1e-5)
    torch.testing.assert_close(got, torch.tensor([1.0, 1 - 12 / (15 + 1e-5)]))


def test_dice_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss_per_mask(torch.zeros(2, 3, 4), torch.zeros(2, 4, 3))


def test_masks_at_stride_samples_cell_centres():
    # 10×13 mask, stride 4, out 3×4: padded to 12×16; rows 2, 6, 10 and columns 2, 6, 10, 14 are
    # taken. Row 10 and column 14 lie in the zero padding.
    mask = torch.zeros(1, 10, 13, dtype=torch.bool)
    mask[0, 2, 2] = True  # -> (0, 0)
    mask[0, 6, 10] = True  # -> (1, 2)
    mask[0, 3, 2] = True  # not a sampled row
    mask[0, 9, 12] = True  # last real pixel, not sampled
    out = masks_at_stride(mask, (3, 4), 4)
    want = torch.zeros(1, 3, 4)
    want[0, 0, 0] = 1
    want[0, 1, 2] = 1
    assert out.dtype == torch.float32
    assert torch.equal(out, want)


def test_masks_at_stride_area_targets_by_hand():
    # Same 10×13 mask padded to 12×16, stride 4: each output is the mean of its 4×4 cell.
    mask = torch.zeros(1, 10, 13, dtype=torch.bool)
    mask[0, 0:4, 0:4] = True  # cell (0, 0) full
    mask[0, 4:6, 8:12] = True  # half of cell (1, 2)
    mask[0, 9, 12] = True  # 1 of the 16 pixels of cell (2, 3), 15 of them padding
    out = masks_at_stride(mask, (3, 4), 4, mode="area")
    want = torch.zeros(1, 3, 4)
    want[0, 0, 0], want[0, 1, 2], want[0, 2, 3] = 1.0, 0.5, 1 / 16
    torch.testing.assert_close(out, want)
    # the centre sample of the same mask sees only the full cell
    assert masks_at_stride(mask, (3, 4), 4).sum() == 1
    with pytest.raises(ValueError, match="mode must be one of"):
        masks_at_stride(mask, (3, 4), 4, mode="bilinear")


def test_masks_at_stride_full_mask_and_padding():
    full = torch.ones(2, 10, 13, dtype=torch.uint8)
    out = masks_at_stride(full, (3, 4), 4)
    want = torch.zeros(2, 3, 4)
    want[:, :2, :3] = 1  # row 10 and column 14 are padding
    assert torch.equal(out, want)


def test_masks_at_stride_threshold_and_odd_stride():
    # stride 3 starts at 1: out (2, 3) samples rows 1, 4 and columns 1, 4, 7 of a 6×9 map
    soft = torch.zeros(1, 6, 9)
    soft[0, 1, 4] = 0.6
    soft[0, 4, 7] = 0.5  # not > 0.5
    soft[0, 4, 1] = 1.0
    out = masks_at_stride(soft, (2, 3), 3)
    assert torch.equal(out, torch.tensor([[[0.0, 1, 0], [1, 0, 0]]]))


def test_masks_at_stride_empty_and_too_large():
    assert masks_at_stride(torch.zeros(0, 10, 13, dtype=torch.bool), (3, 4), 4).shape == (0, 3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        masks_at_stride(torch.zeros(1, 13, 13, dtype=torch.bool), (3, 4), 4)
