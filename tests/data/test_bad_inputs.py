"""Unusual and broken images and boxes: 16-bit and float pixels, EXIF rotation, the
decompression-bomb limit, and boxes outside the image or in unsupported modes."""
import logging

import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from PIL import Image

from diffusiondet.data.dataset_mapper import DiffusionDetDatasetMapper, ImageLoadError
from diffusiondet.data.image_io import read_image

H, W = 48, 64  # non-square, so a swapped height/width shows
BOX = (10, 8, 34, 28)  # abs xyxy of the bright rectangle


def _scene(width=W, height=H):
    """(H, W, 3) uint8: dark noise with a bright rectangle at BOX."""
    pixels = np.random.default_rng(0).integers(0, 60, size=(height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = BOX
    pixels[y0:y1, x0:x1] = 240
    return pixels


def _record(path, width=W, height=H, annotations=()):
    return {"file_name": str(path), "image_id": 1, "width": width, "height": height,
            "annotations": list(annotations)}


def _anno(xyxy, category_id=0, mode=BoxMode.XYXY_ABS):
    return {"bbox": list(xyxy), "bbox_mode": mode, "category_id": category_id, "iscrowd": 0}


def _mapper(is_train=True):
    return DiffusionDetDatasetMapper(is_train, augmentations=[], image_format="RGB")


def test_16bit_grayscale_keeps_the_high_byte(tmp_path):
    values = np.full((H, W), 3000, dtype=np.uint16)
    values[0, :8] = [0, 255, 256, 4095, 32767, 32768, 65280, 65535]
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = _mapper(is_train=False)(_record(path))["image"]  # (3, H, W)
    expected = torch.from_numpy((values >> 8).astype(np.uint8))
    assert image[:, 0, :8].tolist() == [[0, 0, 1, 15, 127, 128, 255, 255]] * 3
    for channel in image:
        torch.testing.assert_close(channel, expected)


def test_16bit_reading_is_consistent_with_pillows_16bit_rgb(tmp_path):
    # Pillow reads 16-bit RGB PNGs as 8-bit RGB by keeping the high byte; grayscale must agree.
    cv2 = pytest.importorskip("cv2")
    values = np.array([[1000, 30000, 65535]], dtype=np.uint16).repeat(W, 0).reshape(1, W, 3)
    values = values.repeat(H, 0)
    cv2.imwrite(str(tmp_path / "rgb16.png"), values[..., ::-1])  # cv2 writes BGR
    Image.fromarray(values[..., 1].copy()).save(tmp_path / "gray16.png")
    rgb = read_image(str(tmp_path / "rgb16.png"), "RGB")
    gray = read_image(str(tmp_path / "gray16.png"), "RGB")
    assert rgb[0, 0].tolist() == [1000 >> 8, 30000 >> 8, 255]
    assert gray[0, 0].tolist() == [30000 >> 8] * 3


@pytest.mark.parametrize("mode, dtype", [("F", np.float32), ("I", np.int32)])
def test_32bit_and_float_images_are_rejected_by_name(tmp_path, caplog, mode, dtype):
    path = tmp_path / f"wide_{mode}.tiff"
    Image.fromarray(np.full((H, W), 70000, dtype=dtype), mode=mode).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(ImageLoadError, match=rf"wide_{mode}\.tiff.*pixel mode '{mode}'"):
        _mapper(is_train=False)(_record(path))
    with caplog.at_level(logging.WARNING):
        assert _mapper(is_train=True)(_record(path)) is None
    assert f"wide_{mode}.tiff" in caplog.text


def _save_exif_rotated(path, orientation):
    """Store _scene() so that a viewer applying ``orientation`` (6 or 8) shows it upright."""
    turn = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_scene()).transpose(turn).save(path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied_and_boxes_refer_to_the_displayed_image(tmp_path, orientation):
    path = tmp_path / f"exif{orientation}.jpg"
    _save_exif_rotated(path, orientation)
    assert Image.open(path).size == (H, W)  # stored portrait
    out = _mapper()(_record(path, annotations=[_anno(BOX)]))
    image = out["image"].float().mean(0)  # (H, W), displayed landscape
    assert image.shape == (H, W)
    ys, xs = torch.nonzero(image > 150, as_tuple=True)
    bright = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert bright == list(BOX)
    assert out["instances"].gt_boxes.tensor.tolist() == [list(map(float, BOX))]


def test_size_mismatch_explained_by_exif_says_so(tmp_path, caplog):
    path = tmp_path / "exif6.jpg"
    _save_exif_rotated(path, 6)
    stored_size = _record(path, width=H, height=W)
    with caplog.at_level(logging.WARNING):
        assert _mapper()(stored_size) is None
    assert "exif6.jpg" in caplog.text and "EXIF orientation 6" in caplog.text
    with pytest.raises(ImageLoadError, match="EXIF orientation 6"):
        _mapper(is_train=False)(stored_size)
    plain = tmp_path / "plain.png"
    Image.fromarray(_scene()).save(plain)
    with pytest.raises(ImageLoadError, match=r"plain\.png' is 64x48 \(WxH\)") as info:
        _mapper(is_train=False)(_record(plain, width=H, height=W))
    assert "EXIF" not in str(info.value)  # no EXIF tag: no misleading hint


def test_decompression_bomb_limit_is_pillows_and_the_error_says_how_to_raise_it(
    tmp_path, monkeypatch
):
    path = tmp_path / "big.png"
    Image.fromarray(_scene()).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H * 2 // 3)  # image = 1.5x the limit
    with pytest.warns(Image.DecompressionBombWarning):
        out = _mapper(is_train=False)(_record(path))  # between 1x and 2x: loads
    assert out["image"].shape == (3, H, W)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", W * H // 3)  # 3x the limit
    with pytest.raises(ImageLoadError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        _mapper(is_train=False)(_record(path))


def test_boxes_outside_the_image_are_clipped_or_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "image.png"
    Image.fromarray(_scene()).save(path)
    annos = [
        _anno((50, 30, 80, 60), 1),  # partly outside: clipped
        _anno((100, 100, 110, 110), 2),  # entirely outside: dropped
        _anno((W - 5, H - 5, W + 0.5, H + 0.5), 3),  # sub-pixel overshoot: clipped, no warning
        _anno((5, 5, 5, 20), 4),  # zero width: dropped as invalid
        _anno(BOX, 5),
    ]
    with caplog.at_level(logging.WARNING):
        inst = _mapper()(_record(path, annotations=annos))["instances"]
    assert inst.gt_classes.tolist() == [1, 3, 5]
    expected = [[50.0, 30.0, W, H], [W - 5.0, H - 5.0, W, H], list(map(float, BOX))]
    assert inst.gt_boxes.tensor.tolist() == expected
    (message,) = [r.getMessage() for r in caplog.records if "image.png" in r.getMessage()]
    assert "dropped 1 annotation(s) with a malformed" in message
    assert "dropped 1 box(es) lying entirely outside the 64x48 (WxH) image" in message
    assert "clipped 1 box(es)" in message


def test_boxes_inside_the_image_log_nothing(tmp_path, caplog):
    path = tmp_path / "image.png"
    Image.fromarray(_scene()).save(path)
    with caplog.at_level(logging.WARNING):
        inst = _mapper()(_record(path, annotations=[_anno(BOX), _anno((0, 0, W, H), 1)]))
    assert len(inst["instances"]) == 2 and "image.png" not in caplog.text


def test_relative_box_mode_is_dropped_not_a_crash(tmp_path, caplog):
    path = tmp_path / "image.png"
    Image.fromarray(_scene()).save(path)
    annos = [_anno((0.1, 0.1, 0.5, 0.5), 0, mode=BoxMode.XYWH_REL), _anno(BOX, 1)]
    with caplog.at_level(logging.WARNING):
        inst = _mapper()(_record(path, annotations=annos))["instances"]
    assert inst.gt_classes.tolist() == [1]
    assert "dropped 1 annotation" in caplog.text
