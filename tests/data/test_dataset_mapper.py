"""DiffusionDetDatasetMapper: output format, augmentation, and bad-input handling."""
import logging

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.data.common import MapDataset
from detectron2.structures import BitMasks, BoxMode, PolygonMasks
from PIL import Image

from diffusiondet.data.augmentation import (
    RandomChoiceOfAugmentations,
    build_diffusiondet_train_augmentation,
    diffusiondet_train_augmentation,
)
from diffusiondet.data.dataset_mapper import DiffusionDetDatasetMapper, ImageLoadError

# pycocotools 2.0.11 mask decoding warns under numpy 2; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 40, 60


def _save(path, mode="RGB", size=(W, H)):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array)
    image = image.convert(mode) if mode != "P" else image.quantize(colors=16)
    image.save(path)
    return str(path)


def _anno(bbox, category_id=0, mode=BoxMode.XYWH_ABS, **extra):
    return {"bbox": bbox, "bbox_mode": mode, "category_id": category_id, "iscrowd": 0, **extra}


def _record(file_name, annotations=None, height=H, width=W):
    record = {"file_name": file_name, "image_id": 1, "height": height, "width": width}
    if annotations is not None:
        record["annotations"] = annotations
    return record


def _mapper(is_train=True, augmentations=(), **kwargs):
    return DiffusionDetDatasetMapper(
        is_train, augmentations=list(augmentations), image_format="RGB", **kwargs
    )


@pytest.fixture
def image_file(tmp_path):
    return _save(tmp_path / "image.png")


def test_output_format_and_resized_boxes(image_file):
    mapper = _mapper(augmentations=[T.ResizeShortestEdge(80, 1000)])  # exact x2
    record = _record(image_file, [_anno([10, 5, 20, 10], 2), _anno([0, 0, 5, 5], 1, iscrowd=1)])
    out = mapper(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 2 * H, 2 * W)
    inst = out["instances"]
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    assert inst.gt_classes.tolist() == [2]  # the crowd object is removed
    assert "annotations" not in out and not inst.has("gt_masks")
    assert record["annotations"][0]["bbox"] == [10, 5, 20, 10]  # input not modified


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_palette_become_three_channels(tmp_path, mode):
    path = _save(tmp_path / f"image_{mode}.png", mode=mode)
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    out = _mapper()(_record(path, []))
    np.testing.assert_array_equal(out["image"].numpy(), expected)


def test_bgr_format_reverses_channels(image_file):
    rgb = _mapper()(_record(image_file, []))["image"]
    bgr_mapper = DiffusionDetDatasetMapper(True, augmentations=[], image_format="BGR")
    bgr = bgr_mapper(_record(image_file, []))["image"]
    torch.testing.assert_close(bgr, rgb.flip(0))


def test_images_without_annotations_are_kept(image_file):
    for record in (_record(image_file, []), _record(image_file)):
        inst = _mapper()(record)["instances"]
        assert len(inst) == 0 and inst.gt_boxes.tensor.shape == (0, 4)


def test_degenerate_and_out_of_image_boxes(image_file):
    annos = [
        _anno([5, 5, 0, 10]),  # zero width: dropped
        _anno([50, 30, 20, 20], 1),  # partly outside: clipped to the image
        _anno([100, 100, 10, 10], 2),  # entirely outside: empty after clipping, dropped
        _anno([-10, -5, 20, 15], 3),  # negative corner, positive size: clipped
    ]
    inst = _mapper()(_record(image_file, annos))["instances"]
    assert inst.gt_classes.tolist() == [1, 3]
    expected = torch.tensor([[50.0, 30.0, 60.0, 40.0], [0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(inst.gt_boxes.tensor, expected)


def test_nan_negative_and_malformed_boxes_are_dropped_with_a_warning(image_file, caplog):
    annos = [
        _anno([float("nan"), 1, 5, 5]),
        _anno([1, 1, -5, 5]),
        _anno([1, 1, 5]),
        _anno([10, 20, 30, 15], 4, mode=BoxMode.XYXY_ABS),  # y1 < y0
        _anno([1, 1, float("inf"), 5]),
        _anno([2, 2, 6, 6], 7),
    ]
    with caplog.at_level(logging.WARNING):
        inst = _mapper()(_record(image_file, annos))["instances"]
    assert inst.gt_classes.tolist() == [7]
    assert "image.png" in caplog.text and "dropped 5 annotation" in caplog.text


@pytest.mark.parametrize("problem", ["missing", "garbage", "truncated", "size_mismatch"])
def test_bad_training_image_is_skipped_and_bad_test_image_raises(tmp_path, caplog, problem):
    path = tmp_path / f"{problem}.png"
    height = H
    if problem == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif problem == "truncated":
        _save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif problem == "size_mismatch":
        _save(path)
        height = H + 1
    record = _record(str(path), [_anno([1, 1, 5, 5])], height=height)

    with caplog.at_level(logging.WARNING):
        assert _mapper(is_train=True)(record) is None
    assert f"{problem}.png" in caplog.text
    with pytest.raises(ImageLoadError, match=f"{problem}.png"):
        _mapper(is_train=False)(record)


def test_map_dataset_substitutes_a_skipped_training_image(tmp_path, image_file):
    records = [
        _record(str(tmp_path / "missing.png"), []),
        _record(image_file, [_anno([1, 1, 5, 5])]),
    ]
    dataset = MapDataset(records, _mapper())
    out = dataset[0]
    assert out["file_name"] == image_file and len(out["instances"]) == 1


def test_test_mode_drops_annotations_and_uses_test_resize(image_file):
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 80, 1000
    mapper = DiffusionDetDatasetMapper(cfg, is_train=False)
    out = mapper(_record(image_file, [_anno([1, 1, 5, 5])]))
    assert out["image"].shape == (3, 80, 120)
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (H, W)  # original size, for postprocessing


def test_horizontal_flip_mirrors_boxes(image_file):
    mapper = _mapper(augmentations=[T.RandomFlip(prob=1.0)])
    out = mapper(_record(image_file, [_anno([10, 5, 20, 10])]))
    expected = torch.tensor([[W - 30.0, 5.0, W - 10.0, 15.0]])
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, expected)
    plain = _mapper()(_record(image_file, []))["image"]
    torch.testing.assert_close(out["image"], plain.flip(2))


@pytest.mark.parametrize("crop_enabled", [False, True])
def test_train_augmentation_keeps_boxes_inside_the_image(image_file, crop_enabled):
    augs = diffusiondet_train_augmentation(
        min_size_train=(48, 64, 80),
        max_size_train=200,
        crop_enabled=crop_enabled,
        crop_size=(30, 50),
        pre_crop_min_sizes=(50, 60),
    )
    mapper = _mapper(augmentations=augs)
    corners = [(0, 0), (20, 10), (45, 28), (30, 30)]
    annos = [_anno([x, y, 12, 9], i % 3) for i, (x, y) in enumerate(corners)]
    np.random.seed(0)
    shapes = set()
    for _ in range(30):
        out = mapper(_record(image_file, annos))
        h, w = out["image"].shape[1:]
        shapes.add((h, w))
        boxes = out["instances"].gt_boxes.tensor
        assert min(h, w) in (48, 64, 80)
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    if crop_enabled:  # crops of 30..50 px change the aspect ratio away from 40:60
        assert any(abs(h / w - H / W) > 0.05 for h, w in shapes)
    else:
        assert all(abs(h / w - H / W) < 0.05 for h, w in shapes)


def test_random_choice_picks_each_branch_with_its_probability():
    aug = RandomChoiceOfAugmentations(
        [[T.RandomFlip(prob=1.0)], [T.NoOpTransform()]], probs=[0.3, 0.7]
    )
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.random.seed(1)
    flips = 0
    for _ in range(400):
        aug_input = T.AugInput(image.copy())
        aug(aug_input)
        flips += int(np.array_equal(aug_input.image, image[:, ::-1]))
    assert 0.22 < flips / 400 < 0.38
    with pytest.raises(ValueError):
        RandomChoiceOfAugmentations([[T.RandomFlip()]], probs=[0.5, 0.5])


def test_build_from_config_reads_crop_keys():
    cfg = get_cfg()
    plain = build_diffusiondet_train_augmentation(cfg)
    assert [type(a).__name__ for a in plain] == ["RandomFlip", "ResizeShortestEdge"]
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.PRE_CROP_MIN_SIZES = (123,)
    (choice,) = build_diffusiondet_train_augmentation(cfg)
    assert isinstance(choice, RandomChoiceOfAugmentations)
    crop_branch = choice.choices[1].augs
    assert [type(a).__name__ for a in crop_branch] == [
        "RandomFlip",
        "ResizeShortestEdge",
        "RandomCrop",
        "ResizeShortestEdge",
    ]
    assert tuple(crop_branch[1].short_edge_length) == (123,)
    assert tuple(crop_branch[2].crop_size) == tuple(cfg.INPUT.CROP.SIZE)


def test_mask_on_keeps_polygons(image_file):
    polygon = [[10.0, 5.0, 30.0, 5.0, 30.0, 15.0, 10.0, 15.0]]
    annos = [
        _anno([10, 5, 20, 10], 1, segmentation=polygon),
        _anno([0, 0, 0, 4], 2, segmentation=polygon),  # empty box: dropped with its mask
    ]
    inst = _mapper(mask_on=True)(_record(image_file, annos))["instances"]
    assert isinstance(inst.gt_masks, PolygonMasks) and len(inst.gt_masks) == len(inst) == 1
    torch.testing.assert_close(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)
    assert not _mapper(mask_on=False)(_record(image_file, annos))["instances"].has("gt_masks")


def test_bitmask_masks_follow_crop(image_file):
    polygon = [[10.0, 5.0, 30.0, 5.0, 30.0, 15.0, 10.0, 15.0]]
    crop = T.CropTransform(5, 0, 40, 30)  # x0, y0, w, h
    mapper = _mapper(augmentations=[crop], mask_on=True, mask_format="bitmask")
    record = _record(image_file, [_anno([10, 5, 20, 10], 1, segmentation=polygon)])
    inst = mapper(record)["instances"]
    assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.shape == (1, 30, 40)
    ys, xs = torch.nonzero(inst.gt_masks.tensor[0], as_tuple=True)
    assert (xs.min().item(), ys.min().item()) == (5, 5)  # polygon shifted by the crop's x0
    torch.testing.assert_close(inst.gt_boxes.tensor, torch.tensor([[5.0, 5.0, 25.0, 15.0]]))
