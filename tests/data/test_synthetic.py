"""The embedded synthetic crowded dataset: determinism, crowdedness, annotation validity, reuse."""
import hashlib
import json
import multiprocessing
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image
from pycocotools.coco import COCO

from diffusiondet.data.synthetic import (
    SYNTHETIC_CROWD_CLASSES,
    dataset_statistics,
    generate_synthetic_crowd,
)

# pycocotools 2.0.11 mask decoding warns under numpy 2; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NUM_IMAGES = 24
SEED = 3


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_crowd(str(root), split="train", num_images=NUM_IMAGES, seed=SEED)


@pytest.fixture(scope="module")
def coco(train_json):
    with open(train_json) as f:
        return json.load(f)


def test_layout_and_categories(train_json, coco):
    root = os.path.dirname(os.path.dirname(train_json))
    assert train_json == os.path.join(root, "annotations", "train.json")
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(SYNTHETIC_CROWD_CLASSES) + 1))
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CROWD_CLASSES)
    assert len(coco["images"]) == NUM_IMAGES
    for im in coco["images"]:
        with Image.open(os.path.join(root, "train", im["file_name"])) as pil:
            assert pil.mode == "RGB" and pil.size == (im["width"], im["height"]) == (160, 160)
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]


def test_same_arguments_give_identical_bytes(tmp_path, train_json):
    other = generate_synthetic_crowd(str(tmp_path), split="train", num_images=NUM_IMAGES, seed=SEED)
    assert _sha256(other) == _sha256(train_json)
    for name in ("000001.png", "000002.png", f"{NUM_IMAGES:06d}.png"):
        a = os.path.join(os.path.dirname(os.path.dirname(train_json)), "train", name)
        assert _sha256(os.path.join(tmp_path, "train", name)) == _sha256(a)


def test_images_do_not_depend_on_set_size_but_on_split_and_seed(tmp_path, train_json):
    train_root = os.path.dirname(os.path.dirname(train_json))
    first = np.asarray(Image.open(os.path.join(train_root, "train", "000001.png")))

    generate_synthetic_crowd(str(tmp_path / "small"), split="train", num_images=2, seed=SEED)
    generate_synthetic_crowd(str(tmp_path / "val"), split="val", num_images=2, seed=SEED)
    generate_synthetic_crowd(str(tmp_path / "seed"), split="train", num_images=2, seed=SEED + 1)

    small = np.asarray(Image.open(tmp_path / "small" / "train" / "000001.png"))
    np.testing.assert_array_equal(small, first)
    for other_set in ("val/val", "seed/train"):
        other = tmp_path / other_set / "000001.png"
        assert not np.array_equal(np.asarray(Image.open(other)), first)


def test_scenes_are_crowded(train_json, coco):
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=NUM_IMAGES + 1)[1:]
    assert counts.mean() >= 10
    assert counts.min() >= 1

    # Independent overlap count with pycocotools' box IoU.
    pairs_03 = 0
    for image_id in range(1, NUM_IMAGES + 1):
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        iou = mask_util.iou(boxes, boxes, [0] * len(anns))
        classes = np.array([a["category_id"] for a in anns])
        same_class = np.triu(classes[:, None] == classes[None, :], k=1)
        pairs_03 += int(((iou > 0.3) & same_class).sum())
    assert pairs_03 >= NUM_IMAGES // 4

    stats = dataset_statistics(train_json)
    assert stats["num_images"] == NUM_IMAGES
    assert stats["mean_objects"] == pytest.approx(counts.mean())
    assert stats["same_class_pairs_iou_gt_0.3"] == pairs_03


def test_annotations_are_valid_visible_regions(train_json, coco):
    api = COCO(train_json)
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SYNTHETIC_CROWD_CLASSES)
        assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
        assert max(w, h) <= 48 + 2  # visible part of an object at most max_object_size (+rounding)
        assert 30 <= ann["area"] <= w * h
        assert ann["segmentation"]
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        mask = api.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert len(ys) > 0.5 * ann["area"]
        # The polygons trace the visible pixels, so they stay inside the visible box.
        assert xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h


def test_reuse_and_regenerate_on_parameter_change(tmp_path):
    path = generate_synthetic_crowd(str(tmp_path), split="train", num_images=3, seed=SEED)
    stamp = os.stat(path).st_mtime_ns
    assert generate_synthetic_crowd(str(tmp_path), split="train", num_images=3, seed=SEED) == path
    assert os.stat(path).st_mtime_ns == stamp

    generate_synthetic_crowd(str(tmp_path), split="train", num_images=2, seed=SEED)
    with open(path) as f:
        info = json.load(f)["info"]["generator"]
    assert info["num_images"] == 2
    assert sorted(os.listdir(tmp_path / "train")) == ["000001.png", "000002.png"]

    os.remove(tmp_path / "train" / "000002.png")  # an incomplete set is regenerated too
    generate_synthetic_crowd(str(tmp_path), split="train", num_images=2, seed=SEED)
    assert os.path.isfile(tmp_path / "train" / "000002.png")

    with open(path, "w") as f:
        f.write('{"images": [')  # a truncated json
    generate_synthetic_crowd(str(tmp_path), split="train", num_images=2, seed=SEED)
    with open(path) as f:
        assert len(json.load(f)["images"]) == 2
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def _generate_in_child(root):
    return generate_synthetic_crowd(root, split="train", num_images=6, seed=SEED)


def test_concurrent_generation_is_safe(tmp_path):
    with multiprocessing.get_context("fork").Pool(3) as pool:
        paths = pool.map(_generate_in_child, [str(tmp_path)] * 3)
    assert len(set(paths)) == 1
    with open(paths[0]) as f:
        coco = json.load(f)
    assert len(coco["images"]) == 6
    assert sorted(os.listdir(tmp_path / "train")) == [im["file_name"] for im in coco["images"]]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    reference = generate_synthetic_crowd(
        str(tmp_path / "ref"), split="train", num_images=6, seed=SEED
    )
    assert _sha256(paths[0]) == _sha256(reference)
