"""abs xyxy <-> normalised cxcywh <-> signal space."""
import pytest
import torch

from diffusiondet.diffusion import (
    boxes_to_signal,
    cxcywh_to_xyxy,
    normalized_cxcywh_to_signal,
    signal_to_boxes,
    signal_to_normalized_cxcywh,
    xyxy_to_cxcywh,
)


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


def _random_boxes_inside(whwh, n):
    """(B, n, 4) abs xyxy boxes inside each image."""
    corners = torch.rand(whwh.shape[0], n, 2, 2) * whwh[:, None, None, :2]
    top_left, bottom_right = corners.min(dim=2).values, corners.max(dim=2).values
    return torch.cat([top_left, bottom_right], dim=-1)


def test_xyxy_cxcywh_round_trip_and_values():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    torch.testing.assert_close(xyxy_to_cxcywh(boxes), torch.tensor([[20.0, 40.0, 20.0, 40.0]]))
    random = torch.rand(2, 3, 5, 4)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(random)), random)


def test_round_trip_inside_images():
    whwh = torch.tensor([[128.0, 96.0, 128.0, 96.0], [112.0, 80.0, 112.0, 80.0]])
    boxes = _random_boxes_inside(whwh, 50)
    signal = boxes_to_signal(boxes, whwh, 2.0)
    assert signal.abs().max() <= 2.0 + 1e-5
    assert (signal_to_boxes(signal, whwh, 2.0) - boxes).abs().max() <= 1e-4


def test_per_image_sizes_are_used():
    whwh = torch.tensor([[100.0, 50.0, 100.0, 50.0], [200.0, 10.0, 200.0, 10.0]])
    full_image = torch.tensor([[[0.0, 0.0, 100.0, 50.0]], [[0.0, 0.0, 200.0, 10.0]]])
    # centre 0.5 and size 1 map to signal (0, 0, 2, 2)
    expected = torch.tensor([0.0, 0.0, 2.0, 2.0]).expand(2, 1, 4)
    torch.testing.assert_close(boxes_to_signal(full_image, whwh, 2.0), expected)
    torch.testing.assert_close(signal_to_boxes(expected, whwh, 2.0), full_image)


def test_single_image_whwh_vector():
    whwh = torch.tensor([64.0, 32.0, 64.0, 32.0])
    boxes = torch.tensor([[8.0, 4.0, 40.0, 20.0], [0.0, 0.0, 64.0, 32.0]])
    torch.testing.assert_close(signal_to_boxes(boxes_to_signal(boxes, whwh, 1.5), whwh, 1.5), boxes)


def test_clamp_outside_signal_range():
    whwh = torch.tensor([[100.0, 100.0, 100.0, 100.0]])
    # cx far right, cy far up, width huge, height negative -> clamped to ±scale first.
    x = torch.tensor([[[5.0, -7.0, 3.0, -3.0]]])
    normalized = signal_to_normalized_cxcywh(x, 2.0)
    torch.testing.assert_close(normalized, torch.tensor([[[1.0, 0.0, 1.0, 0.0]]]))
    boxes = signal_to_boxes(x, whwh, 2.0)
    # No further clipping: the box sticks out of the image and has zero height.
    torch.testing.assert_close(boxes, torch.tensor([[[50.0, 0.0, 150.0, 0.0]]]))


def test_normalized_signal_inverse():
    b = torch.rand(4, 4)
    signal = normalized_cxcywh_to_signal(b, 2.0)
    torch.testing.assert_close(signal_to_normalized_cxcywh(signal, 2.0), b)


# --- dtype ------------------------------------------------------------------------------------
# Float64 image sizes must not promote float32 boxes.


def test_conversions_keep_the_box_dtype_for_float64_image_sizes():
    whwh = torch.tensor([[640.0, 480.0, 640.0, 480.0]], dtype=torch.float64)
    boxes = torch.tensor([[[10.0, 20.0, 300.0, 200.0]]])
    signal = boxes_to_signal(boxes, whwh, 2.0)
    assert signal.dtype == torch.float32
    back = signal_to_boxes(signal, whwh, 2.0)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-3)
