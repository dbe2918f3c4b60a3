"""Training-augmentation branches the default config never takes, driven through the config and
DiffusionDetDatasetMapper: INPUT.MIN_SIZE_TRAIN_SAMPLING "range", INPUT.RANDOM_FLIP "vertical"
and the DETR-style crop branch (INPUT.CROP.ENABLED). Boxes are checked against hand-computed
values on a non-square (40 x 60) image.
"""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.structures import BoxMode
from PIL import Image

from diffusiondet.config import add_diffusiondet_config
from diffusiondet.data.dataset_mapper import DiffusionDetDatasetMapper

H, W = 40, 60
# abs xyxy boxes and their classes: a box in the upper left, one reaching the lower right area,
# one in the lower left corner.
BOXES = [[10.0, 5.0, 30.0, 15.0], [35.0, 22.0, 55.0, 36.0], [0.0, 30.0, 8.0, 40.0]]
CLASSES = [0, 1, 2]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(path, (H, W, 3) uint8 array) of a random-pixel PNG: every crop of it is unique."""
    array = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("augmentation") / "image.png")
    Image.fromarray(array).save(path)
    return path, array


def _record(path):
    annotations = [
        {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": c, "iscrowd": 0}
        for box, c in zip(BOXES, CLASSES)
    ]
    return {"file_name": path, "image_id": 1, "height": H, "width": W, "annotations": annotations}


def _mapper(*opts):
    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    base = ["INPUT.FORMAT", "RGB", "INPUT.MAX_SIZE_TRAIN", 1000, "INPUT.RANDOM_FLIP", "none"]
    cfg.merge_from_list(base + list(opts))
    return DiffusionDetDatasetMapper(cfg, is_train=True)


def _outputs(mapper, path, seeds):
    """[(image (H', W', 3) uint8, boxes (G, 4) list, classes list)] for np.random seeds."""
    results = []
    for seed in seeds:
        np.random.seed(seed)
        out = mapper(_record(path))
        inst = out["instances"]
        results.append((out["image"].permute(1, 2, 0).numpy(), inst.gt_boxes.tensor.tolist(),
                        inst.gt_classes.tolist()))  # fmt: skip
    return results


def test_min_size_train_sampling_range_draws_sizes_in_the_range(image):
    path, _ = image
    mapper = _mapper("INPUT.MIN_SIZE_TRAIN", (40, 72), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range")
    heights = []
    for array, boxes, classes in _outputs(mapper, path, range(30)):
        h, w = array.shape[:2]
        heights.append(h)
        assert 40 <= h <= 72  # the short side (height) is drawn from [40, 72]
        assert abs(w - W * h / H) <= 0.5  # aspect ratio kept (width rounded)
        expected = [[x0 * w / W, y0 * h / H, x1 * w / W, y1 * h / H] for x0, y0, x1, y1 in BOXES]
        torch.testing.assert_close(torch.tensor(boxes), torch.tensor(expected), atol=1e-4, rtol=0)
        assert classes == CLASSES
    # Not just the two ends of the range ("choice" sampling of (40, 72) gives only those).
    assert len(set(heights)) >= 10 and set(heights) - {40, 72}


def test_vertical_flip_mirrors_boxes_top_to_bottom(image):
    path, array = image
    mapper = _mapper("INPUT.MIN_SIZE_TRAIN", (H,), "INPUT.RANDOM_FLIP", "vertical")  # no resize
    upside_down = [[x0, H - y1, x1, H - y0] for x0, y0, x1, y1 in BOXES]
    flipped = 0
    for out, boxes, classes in _outputs(mapper, path, range(16)):
        assert classes == CLASSES
        if np.array_equal(out, array):
            assert boxes == BOXES
        else:  # the rows reversed, columns not
            np.testing.assert_array_equal(out, array[::-1])
            assert boxes == upside_down == [[10.0, 25.0, 30.0, 35.0], [35.0, 4.0, 55.0, 18.0],
                                            [0.0, 0.0, 8.0, 10.0]]  # fmt: skip
            flipped += 1
    assert 0 < flipped < 16  # RandomFlip's probability 0.5


def test_crop_branch_crops_and_clips_boxes(image):
    path, array = image
    # Crop branch: pre-crop resize to 40 (none), a 20 x 24 crop, final resize to 20 (none).
    # Base branch: resize 40 x 60 -> 20 x 30. The output size tells the branches apart.
    mapper = _mapper(
        "INPUT.MIN_SIZE_TRAIN", (20,), "INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE", "absolute",
        "INPUT.CROP.SIZE", (20, 24), "INPUT.CROP.PRE_CROP_MIN_SIZES", (40,),
    )  # fmt: skip
    offsets, clipped, dropped, base = set(), 0, 0, 0
    for out, boxes, classes in _outputs(mapper, path, range(40)):
        if out.shape[:2] == (20, 30):
            base += 1
            assert boxes == [[v / 2 for v in box] for box in BOXES] and classes == CLASSES
            continue
        assert out.shape[:2] == (20, 24)
        # Where the crop came from: the one window of the random-pixel image equal to it.
        (oy, ox), = [(y, x) for y in range(H - 20 + 1) for x in range(W - 24 + 1)
                     if np.array_equal(array[y:y + 20, x:x + 24], out)]  # fmt: skip
        offsets.add((oy, ox))
        expected_boxes, expected_classes = [], []
        for (x0, y0, x1, y1), c in zip(BOXES, CLASSES):
            box = [min(max(x0 - ox, 0), 24), min(max(y0 - oy, 0), 20),
                   min(max(x1 - ox, 0), 24), min(max(y1 - oy, 0), 20)]  # fmt: skip
            if box[2] > box[0] and box[3] > box[1]:
                expected_boxes.append(box)
                expected_classes.append(c)
                clipped += box != [x0 - ox, y0 - oy, x1 - ox, y1 - oy]
            else:
                dropped += 1
        assert boxes == expected_boxes and classes == expected_classes, (oy, ox)
    # Both branches are taken (probability 0.5 each), at several crop positions, and the crop
    # both clips boxes and drops boxes left outside it.
    assert 5 <= base <= 35 and len(offsets) >= 5
    assert clipped > 0 and dropped > 0


def _pre_crop_size(height, width, *opts):
    """(h, w) after the crop branch's pre-crop resize, built from a config with ``opts``."""
    from detectron2.data import transforms as T

    from diffusiondet.data.augmentation import build_diffusiondet_train_augmentation

    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    cfg.merge_from_list(["INPUT.CROP.ENABLED", True, "INPUT.CROP.PRE_CROP_MIN_SIZES", (600,), *opts])
    (choice,) = build_diffusiondet_train_augmentation(cfg)
    pre_resize = choice.choices[1].augs[1]  # crop branch: flip, pre-crop resize, crop, resize
    assert isinstance(pre_resize, T.ResizeShortestEdge)
    transform = pre_resize.get_transform(np.zeros((height, width, 3), np.uint8))
    return transform.new_h, transform.new_w


def test_crop_branch_pre_resize_is_capped_by_its_max_size():
    # A 3000:1 strip: uncapped (as in the official code) its long side would be 1.8M pixels.
    assert _pre_crop_size(10, 30000, "INPUT.CROP.PRE_CROP_MAX_SIZE", 4000) == (1, 4000)
    assert _pre_crop_size(10, 30000, "INPUT.CROP.PRE_CROP_MAX_SIZE", 2000) == (1, 2000)
    # An ordinary image (COCO's widest aspects) is resized as without a cap by the default.
    assert _pre_crop_size(213, 640) == (600, 1803)
