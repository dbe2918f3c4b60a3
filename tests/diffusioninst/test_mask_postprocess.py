"""masks_to_image: upsample, crop, resize, threshold and box clipping on hand-derived cases."""
import pytest
import torch

from diffusioninst.modeling.mask_postprocess import masks_to_image


def test_constant_map_inside_box_only():
    # 6×8 map at stride 4 = 24×32 padded input; un-padded 20×28; original 30×45
    probs = torch.full((2, 6, 8), 0.7)
    boxes = torch.tensor([[5.9, 3.2, 20.7, 17.99], [0.0, 0.0, 45.0, 30.0]])
    out = masks_to_image(probs, 4, (20, 28), (30, 45), boxes)
    assert out.dtype == torch.bool and out.shape == (2, 30, 45)
    # int truncation: x 5..19, y 3..16 (x2 = 20, y2 = 17 excluded)
    want = torch.zeros(30, 45, dtype=torch.bool)
    want[3:17, 5:20] = True
    assert torch.equal(out[0], want)
    assert out[1].all()
    assert masks_to_image(probs, 4, (20, 28), (30, 45), None).all()


def test_threshold_is_strict():
    probs = torch.full((1, 3, 5), 0.5)
    assert not masks_to_image(probs, 4, (12, 20), (12, 20), None).any()
    assert masks_to_image(probs, 4, (12, 20), (12, 20), None, threshold=0.4).all()


def test_crop_happens_before_resize():
    # probability 1 only in map rows >= 4 and columns >= 6 of a 6×8 map (padded 24×32).
    # Upsampled, values rise 0 -> 1 between pixel rows 14 and 18 (cell centres 4i + 2) and columns
    # 22 and 26, so the un-padded 16×24 crop peaks at pixel (15, 23) with 1 − .75·.75 = .4375.
    # Without the crop the resize would pull the bright padding into the image.
    probs = torch.zeros(1, 6, 8)
    probs[0, 4:, :] = 1.0
    probs[0, :, 6:] = 1.0
    assert not masks_to_image(probs, 4, (16, 24), (33, 50), None).any()
    uncropped = masks_to_image(probs, 4, (24, 32), (33, 50), None)
    assert uncropped[0, -1].all() and uncropped[0, :, -1].all()


def _tent(u, centre):
    return (1 - (u - centre).abs() / 4).clamp(min=0)


def test_single_cell_upsample_and_resize_by_hand():
    # One bright cell (2, 3) in a 5×7 map at stride 4 (padded 20×28). aligned_bilinear ×4 turns it
    # into the separable tent (1 − |y − 10|/4)·(1 − |x − 14|/4) centred on pixel (4·2+2, 4·3+2).
    probs = torch.zeros(1, 5, 7)
    probs[0, 2, 3] = 1.0
    same = masks_to_image(probs, 4, (18, 26), (18, 26), None)[0]
    # no resize: tent > .5 on the 3×3 block around (10, 14) (corner .75·.75 = .5625; edge 2 -> .5)
    want = torch.zeros(18, 26, dtype=torch.bool)
    want[9:12, 13:16] = True
    assert torch.equal(same, want)
    # resize 18×26 -> 23×61 (align_corners=False): output Y samples u = (Y + .5)·18/23 − .5
    # (clamped at 0), and linear interpolation of a tent with integer knots is the tent itself.
    # These sizes make align_corners=True differ in 3 pixels.
    uy = ((torch.arange(23, dtype=torch.float64) + 0.5) * 18 / 23 - 0.5).clamp(min=0)
    ux = ((torch.arange(61, dtype=torch.float64) + 0.5) * 26 / 61 - 0.5).clamp(min=0)
    value = _tent(uy, 10)[:, None] * _tent(ux, 14)[None, :]
    assert ((value - 0.5).abs() > 1e-3).all()  # no pixel sits on the threshold
    got = masks_to_image(probs, 4, (18, 26), (23, 61), None)[0]
    assert torch.equal(got, value > 0.5)
    assert got.sum() > 9  # the resize really enlarged the blob


def test_chunks_give_the_same_result():
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(130, 6, 8, generator=generator)
    boxes = torch.rand(130, 4, generator=generator) * torch.tensor([20.0, 15, 20, 15])
    boxes[:, 2:] += boxes[:, :2]
    for box_arg in (boxes, None):
        big = masks_to_image(probs, 4, (22, 30), (31, 41), box_arg, chunk_size=1000)
        small = masks_to_image(probs, 4, (22, 30), (31, 41), box_arg, chunk_size=7)
        assert torch.equal(big, small)
        assert big.any() and not big.all()
        # every mask really is its own (random maps give distinct masks)
        assert not torch.equal(big[0], big[-1])


def test_empty_and_errors():
    out = masks_to_image(torch.zeros(0, 6, 8), 4, (20, 28), (30, 45), torch.zeros(0, 4))
    assert out.shape == (0, 30, 45) and out.dtype == torch.bool
    with pytest.raises(ValueError, match="exceeds the padded size"):
        masks_to_image(torch.zeros(1, 6, 8), 4, (25, 28), (30, 45), None)
    with pytest.raises(ValueError, match="boxes must be"):
        masks_to_image(torch.zeros(2, 6, 8), 4, (20, 28), (30, 45), torch.zeros(3, 4))
