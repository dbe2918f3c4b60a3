"""GT instance masks from DiffusionDetDatasetMapper (DiffusionInst, ``INPUT.MASK_FORMAT bitmask``).

Shape legend: H0×W0 = 37×53 original image (non-square on purpose), H×W augmented image,
G kept objects. Expected masks are rasterised by hand with numpy slicing: a polygon with integer
vertices covers pixel (y, x) iff the pixel's square [x, x+1)×[y, y+1) lies inside it.
"""
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks
from PIL import Image

from diffusiondet.data.dataset_mapper import DiffusionDetDatasetMapper

# pycocotools 2.0.11 mask decoding warns under numpy 2; harmless.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H0, W0 = 37, 53
# An L shape (not mirror-symmetric, so a missing or doubled flip shows): x, y vertices.
L_POLYGON = [10, 5, 30, 5, 30, 12, 18, 12, 18, 25, 10, 25]
L_BOX = [10, 5, 30, 25]  # abs xyxy
SQUARE_POLYGON = [40, 20, 48, 20, 48, 30, 40, 30]
SQUARE_BOX = [40, 20, 48, 30]


def _l_mask(height, width, flip=False, sx=1, sy=1):
    """Hand-rasterised L_POLYGON after an optional horizontal flip of the W0-wide image and an
    integer scale (sx, sy)."""
    mask = np.zeros((height, width), dtype=bool)
    top, bottom = (10, 30), (10, 18)  # x ranges [x0, x1) of rows 5..11 and 12..24
    if flip:
        top, bottom = (W0 - 30, W0 - 10), (W0 - 18, W0 - 10)
    mask[5 * sy : 12 * sy, top[0] * sx : top[1] * sx] = True
    mask[12 * sy : 25 * sy, bottom[0] * sx : bottom[1] * sx] = True
    return mask


def _square_mask(height=H0, width=W0):
    mask = np.zeros((height, width), dtype=bool)
    mask[20:30, 40:48] = True
    return mask


def _compressed_rle(mask):
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def _uncompressed_rle(mask):
    """COCO's iscrowd-style RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    assert sum(counts) == mask.size
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


@pytest.fixture
def image_file(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(H0, W0, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    return str(path)


def _anno(box_xyxy, category_id, segmentation, **extra):
    return {
        "bbox": list(box_xyxy),
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "iscrowd": 0,
        "segmentation": segmentation,
        **extra,
    }


def _map(image_file, annotations, augmentations=(), mask_format="bitmask"):
    record = {"file_name": image_file, "image_id": 1, "height": H0, "width": W0}
    if annotations is not None:
        record["annotations"] = annotations
    mapper = DiffusionDetDatasetMapper(
        True,
        augmentations=list(augmentations),
        image_format="RGB",
        mask_on=True,
        mask_format=mask_format,
    )
    return mapper(record)


def _flip_resize():
    # Non-uniform integer scale (x3 wide, x2 high) so that swapped axes show.
    return [T.HFlipTransform(W0), T.ResizeTransform(H0, W0, 2 * H0, 3 * W0)]


def _masks(out):
    inst = out["instances"]
    assert isinstance(inst.gt_masks, BitMasks)
    assert inst.gt_masks.tensor.dtype == torch.bool
    assert inst.gt_masks.tensor.shape == (len(inst), *out["image"].shape[1:])
    return inst.gt_masks.tensor.numpy()


def _assert_boxes_match_masks(inst):
    """Every kept box is the tight box of the mask in the same row."""
    torch.testing.assert_close(inst.gt_masks.get_bounding_boxes().tensor, inst.gt_boxes.tensor)


def test_polygon_bitmask_follows_flip_and_resize(image_file):
    out = _map(image_file, [_anno(L_BOX, 1, [L_POLYGON])], _flip_resize())
    assert tuple(out["image"].shape) == (3, 2 * H0, 3 * W0)
    masks = _masks(out)
    expected = _l_mask(2 * H0, 3 * W0, flip=True, sx=3, sy=2)
    assert expected.sum() == (7 * 20 + 13 * 8) * 6  # the hand rasterisation itself
    np.testing.assert_array_equal(masks[0], expected)
    _assert_boxes_match_masks(out["instances"])
    # The image went through the same transforms.
    original = np.asarray(Image.open(image_file))
    expected_image = _flip_resize()[1].apply_image(np.ascontiguousarray(original[:, ::-1]))
    np.testing.assert_array_equal(out["image"].numpy().transpose(1, 2, 0), expected_image)


@pytest.mark.parametrize("encode", [_compressed_rle, _uncompressed_rle], ids=["compressed", "raw"])
@pytest.mark.parametrize("augs", ["flip_resize", "flip_crop"])
def test_rle_gives_the_same_mask_as_the_polygon(image_file, encode, augs):
    augmentations = (
        _flip_resize()
        if augs == "flip_resize"
        else [T.HFlipTransform(W0), T.CropTransform(4, 3, 40, 30)]  # x0, y0, w, h
    )
    rle = encode(_l_mask(H0, W0))
    from_rle = _masks(_map(image_file, [_anno(L_BOX, 1, rle)], augmentations))
    from_polygon = _masks(_map(image_file, [_anno(L_BOX, 1, [L_POLYGON])], augmentations))
    assert from_rle.shape == ((1, 2 * H0, 3 * W0) if augs == "flip_resize" else (1, 30, 40))
    np.testing.assert_array_equal(from_rle, from_polygon)
    if augs == "flip_resize":
        expected = _l_mask(2 * H0, 3 * W0, flip=True, sx=3, sy=2)
    else:
        expected = _l_mask(H0, W0, flip=True)[3:33, 4:44]
    np.testing.assert_array_equal(from_rle[0], expected)


def test_crowd_rle_is_dropped_and_rows_stay_aligned(image_file):
    crowd = np.zeros((H0, W0), dtype=bool)
    crowd[0:4, 0:50] = True
    annos = [
        _anno(L_BOX, 1, [L_POLYGON]),
        _anno([0, 0, 50, 4], 2, _uncompressed_rle(crowd), iscrowd=1),
        _anno(SQUARE_BOX, 3, _compressed_rle(_square_mask())),
    ]
    out = _map(image_file, annos, [T.HFlipTransform(W0)])
    inst = out["instances"]
    masks = _masks(out)
    assert inst.gt_classes.tolist() == [1, 3]
    np.testing.assert_array_equal(masks[0], _l_mask(H0, W0, flip=True))
    np.testing.assert_array_equal(masks[1], _square_mask()[:, ::-1])
    _assert_boxes_match_masks(inst)


def test_objects_dropped_with_their_boxes_drop_their_masks(image_file):
    annos = [
        _anno([60, 0, 70, 10], 4, [[60, 0, 70, 0, 70, 10, 60, 10]]),  # box outside the image
        _anno(L_BOX, 1, [L_POLYGON]),
        _anno([0, 30, 6, 36], 5, [[0, 30, 6, 30, 6, 36, 0, 36]]),  # cropped away below
        _anno(SQUARE_BOX, 3, _compressed_rle(_square_mask())),
    ]
    crop = T.CropTransform(0, 0, W0, 28)  # keeps rows 0..27: the L whole, the square in part
    out = _map(image_file, annos, [crop])
    inst = out["instances"]
    masks = _masks(out)
    assert inst.gt_classes.tolist() == [1, 3]
    np.testing.assert_array_equal(masks[0], _l_mask(H0, W0)[:28])
    np.testing.assert_array_equal(masks[1], _square_mask()[:28])
    _assert_boxes_match_masks(inst)


@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
@pytest.mark.parametrize("annotations", ["empty", "missing", "crowd_only"])
def test_image_without_objects_gets_empty_masks(image_file, annotations, mask_format):
    crowd = [_anno(L_BOX, 1, _compressed_rle(_l_mask(H0, W0)), iscrowd=1)]
    annos = {"empty": [], "missing": None, "crowd_only": crowd}[annotations]
    out = _map(image_file, annos, _flip_resize(), mask_format=mask_format)
    inst = out["instances"]
    assert len(inst) == 0 and inst.gt_boxes.tensor.shape == (0, 4)
    if mask_format == "bitmask":
        assert _masks(out).shape == (0, 2 * H0, 3 * W0)
    else:
        assert isinstance(inst.gt_masks, PolygonMasks) and len(inst.gt_masks) == 0


@pytest.mark.parametrize(
    "mask_format, crop",
    [("bitmask", False), ("bitmask", True), ("polygon", False)],  # polygon crops need shapely
    ids=["bitmask", "bitmask_crop", "polygon"],
)
def test_degenerate_annotations_are_skipped_with_a_warning(image_file, caplog, mask_format, crop):
    annos = [
        _anno(L_BOX, 1, []),  # empty polygon list
        _anno(L_BOX, 2, [L_POLYGON]),
        _anno([10, 5, 10, 25], 3, [L_POLYGON]),  # zero-area box
        _anno(L_BOX, 4, [[10, 5, 30, 5]]),  # a "polygon" of two points
        _anno(L_BOX, 5, [[10, 5, 30, 5, 30]]),  # odd number of coordinates
        _anno(SQUARE_BOX, 6, _compressed_rle(np.ones((H0 + 1, W0), bool))),  # wrong-size RLE
        {k: v for k, v in _anno(SQUARE_BOX, 7, None).items() if k != "segmentation"},
        _anno(SQUARE_BOX, 8, [SQUARE_POLYGON]),
    ]
    augmentations = [T.CropTransform(0, 0, W0, 36)] if crop else []
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        out = _map(image_file, annos, augmentations, mask_format=mask_format)
    inst = out["instances"]
    assert inst.gt_classes.tolist() == [2, 8]
    height = 36 if crop else H0
    if mask_format == "bitmask":
        masks = _masks(out)
        np.testing.assert_array_equal(masks[0], _l_mask(H0, W0)[:height])
        np.testing.assert_array_equal(masks[1], _square_mask()[:height])
    else:
        assert isinstance(inst.gt_masks, PolygonMasks) and len(inst.gt_masks) == 2
    _assert_boxes_match_masks(inst)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # one warning per image, naming the file and counts
    assert "image.png" in warnings[0]
    assert "dropped 1 annotation(s) with a malformed" in warnings[0]  # the zero-area box
    assert "dropped 5 annotation(s) with a missing, empty or malformed segmentation" in warnings[0]
