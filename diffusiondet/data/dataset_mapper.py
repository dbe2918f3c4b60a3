"""DiffusionDet dataset mapper: read, augment and convert one detectron2 dataset dict.

Shape legend: H, W image height/width after augmentation; G ground-truth boxes kept in an image.
Boxes come in any detectron2 ``BoxMode`` (COCO json: abs xywh) and leave as abs xyxy
(``gt_boxes``), clipped to the augmented image.

Bad input never crashes training: an unreadable, missing or wrongly sized image is logged and the
mapper returns None, so detectron2's ``MapDataset`` substitutes another sample; annotations with
malformed, non-finite or empty boxes, or boxes lying entirely outside the image, are dropped and
boxes reaching more than a pixel beyond it are clipped; with masks on, annotations whose
segmentation is missing, empty or malformed (no polygon of at least 3 finite points, an RLE of
another size) are dropped too. One warning per image names the file and the counts. At test time
the same image problems raise :class:`ImageLoadError`, because an evaluation must not silently
skip images. Images are read by :mod:`.image_io` (EXIF orientation applied, 16-bit grayscale
reduced to 8 bits, Pillow's decompression-bomb limit kept).
"""
import copy
import importlib.util
import logging
from typing import List, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, Instances, PolygonMasks
from PIL import Image

from .augmentation import RandomChoiceOfAugmentations, build_diffusiondet_train_augmentation
from .image_io import check_image_size, read_image

__all__ = ["DiffusionDetDatasetMapper", "ImageLoadError"]

logger = logging.getLogger(__name__)

# What PIL / detectron2 raise for missing, corrupt, truncated, oversized or wrongly sized images
# (SizeMismatchError is a ValueError).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageLoadError(RuntimeError):
    """An evaluation image could not be used; the message names the file."""


class DiffusionDetDatasetMapper:
    """Map a detectron2 dataset dict to the model input format.

    Output dict: the input fields plus ``"image"``, a (3, H, W) uint8 tensor in ``image_format``
    channel order, and in training ``"instances"``: ``Instances`` with ``gt_boxes``
    (``Boxes`` (G, 4) abs xyxy), ``gt_classes`` ((G,) int64) and, with ``mask_on``,
    ``gt_masks`` (``PolygonMasks`` or (G, H, W) bool ``BitMasks``, row i belonging to box i;
    segmentations may be polygons or compressed/uncompressed COCO RLE). Crowd (``iscrowd=1``)
    objects are removed in training and boxes (or masks) left empty by clipping are dropped with
    their masks (boxes); images without annotations keep an empty ``Instances`` (with empty
    ``gt_masks`` when ``mask_on``).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str = "RGB",
        mask_on: bool = False,
        mask_format: str = "polygon",
    ):
        """
        Args:
            is_train: training mode (annotations kept, bad images skipped) or test mode
                (annotations dropped, bad images raise).
            augmentations: applied in order to the image, boxes and masks.
            image_format: any format of ``detection_utils.read_image`` ("RGB", "BGR", ...);
                grayscale, palette and RGBA files are converted to it.
            mask_on: keep instance masks (DiffusionInst); otherwise segmentation and keypoints
                are dropped.
            mask_format: "polygon" or "bitmask" (the ``gt_masks`` type).
        """
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got '{mask_format}'")
        crops_polygons = mask_on and mask_format == "polygon" and _contains_crop(augmentations)
        if crops_polygons and importlib.util.find_spec("shapely") is None:
            raise ImportError(
                "Cropping polygon masks needs the 'shapely' package; install it or use "
                "mask_format='bitmask' (INPUT.MASK_FORMAT bitmask)."
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.mask_on = mask_on
        self.mask_format = mask_format
        mode = "training" if is_train else "inference"
        logger.info("[DiffusionDetDatasetMapper] Augmentations used in %s: %s", mode, augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        """Reads INPUT.* (augmentations, FORMAT, MASK_FORMAT) and MODEL.MASK_ON."""
        if is_train:
            augmentations = build_diffusiondet_train_augmentation(cfg)
        else:
            # [ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)]
            augmentations = utils.build_augmentation(cfg, is_train=False)
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "mask_on": cfg.MODEL.MASK_ON,
            "mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """
        Args:
            dataset_dict: one image in detectron2 dataset format (not modified).

        Returns:
            The mapped dict described in the class docstring, or None in training when the image
            cannot be used.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)
        if image is None:
            return None
        original_hw = image.shape[:2]
        aug_input = T.AugInput(image)
        try:
            transforms = self.augmentations(aug_input)
        except ValueError as e:
            # A resize to a zero side (a 3000x1 image: "height and width must be > 0"): the
            # image is unusable as a file that does not decode is.
            file_name = dataset_dict["file_name"]
            size = f"{original_hw[1]}x{original_hw[0]} (WxH)"
            if not self.is_train:
                raise ImageLoadError(f"Cannot use evaluation image '{file_name}' of {size}: {e}") from e
            logger.warning("Skipping training image '%s' of %s: augmentation failed: %s", file_name, size, e)
            return None
        image = aug_input.image
        image_hw = image.shape[:2]
        chw = np.ascontiguousarray(image.transpose(2, 0, 1))
        dataset_dict["image"] = torch.as_tensor(chw)  # (3, H, W) uint8

        annotations = dataset_dict.pop("annotations", [])
        if not self.is_train:
            return dataset_dict
        dataset_dict["instances"] = self._annotations_to_instances(
            annotations, transforms, original_hw, image_hw, dataset_dict["file_name"]
        )
        return dataset_dict

    def _read_image(self, dataset_dict: dict) -> Optional[np.ndarray]:
        """(H0, W0, C) uint8 image, or None (training) / ImageLoadError (test) when unusable."""
        file_name = dataset_dict["file_name"]
        try:
            image = read_image(file_name, format=self.image_format)
            check_image_size(dataset_dict, image)
        except _IMAGE_ERRORS as e:
            if not self.is_train:
                raise ImageLoadError(f"Cannot use evaluation image '{file_name}': {e}") from e
            logger.warning("Skipping training image '%s': %s: %s", file_name, type(e).__name__, e)
            return None
        return image

    def _annotations_to_instances(
        self,
        annotations: List[dict],
        transforms: T.TransformList,
        original_hw: Sequence[int],
        image_hw: Sequence[int],
        file_name: str,
    ) -> Instances:
        annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
        status = _box_status(annotations, original_hw)
        annotations = [a for a, code in zip(annotations, status) if code in (_OK, _CLIPPED)]
        bad_segmentation_ids = []
        if self.mask_on:
            segmentations = [
                _clean_segmentation(a.get("segmentation"), original_hw) for a in annotations
            ]
            bad_segmentation_ids = [a.get("id") for a, s in zip(annotations, segmentations) if s is None]
            for anno, segmentation in zip(annotations, segmentations):
                anno["segmentation"] = segmentation
            annotations = [a for a in annotations if a["segmentation"] is not None]
        _warn_about_annotations(status, bad_segmentation_ids, original_hw, file_name)
        for anno in annotations:
            anno.pop("keypoints", None)
            if not self.mask_on:
                anno.pop("segmentation", None)
        crops = any(isinstance(t, T.CropTransform) for t in transforms.transforms)
        if self.mask_format == "bitmask" and crops:
            # Cropping polygons needs shapely; cropping the rasterised mask does not, and the
            # output is a bitmask anyway.
            for anno in annotations:
                if "segmentation" in anno:
                    anno["segmentation"] = _polygons_to_rle(anno["segmentation"], original_hw)
        image_hw = tuple(image_hw)
        annotations = [
            utils.transform_instance_annotations(a, transforms, image_hw) for a in annotations
        ]
        instances = utils.annotations_to_instances(
            annotations, image_hw, mask_format=self.mask_format
        )
        if self.mask_on and not instances.has("gt_masks"):  # no annotations left
            if self.mask_format == "bitmask":
                instances.gt_masks = BitMasks(torch.zeros((0, *image_hw), dtype=torch.bool))
            else:
                instances.gt_masks = PolygonMasks([])
        return utils.filter_empty_instances(instances)


# _box_status codes.
_OK, _INVALID, _OUTSIDE, _CLIPPED = 0, 1, 2, 3
# Boxes may overshoot the image by this much (pixels) without a warning: float rounding in
# COCO-style jsons routinely gives x + w = width + 0.01.
_CLIP_TOLERANCE = 1.0


def _box_status(annotations: List[dict], image_hw: Sequence[int]) -> np.ndarray:
    """(M,) int8 per annotation: _OK; _INVALID (malformed, non-finite, relative-mode or empty
    box); _OUTSIDE (no overlap with the (H0, W0) image); _CLIPPED (reaches beyond it)."""
    height, width = image_hw
    status = np.full(len(annotations), _INVALID, dtype=np.int8)
    for i, anno in enumerate(annotations):
        try:
            box = np.asarray(anno["bbox"], dtype=np.float64)
            if box.shape != (4,) or not np.isfinite(box).all():
                continue
            # abs xyxy; relative modes raise AssertionError in detectron2
            x0, y0, x1, y1 = BoxMode.convert(box[None], anno["bbox_mode"], BoxMode.XYXY_ABS)[0]
        except (KeyError, TypeError, ValueError, AssertionError):
            continue
        if not (x1 > x0 and y1 > y0):
            continue
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            status[i] = _OUTSIDE
        elif min(x0, y0) < -_CLIP_TOLERANCE or x1 > width + _CLIP_TOLERANCE or (
            y1 > height + _CLIP_TOLERANCE
        ):
            status[i] = _CLIPPED
        else:
            status[i] = _OK
    return status


def _warn_about_annotations(
    status: np.ndarray, bad_segmentation_ids: list, image_hw: Sequence[int], file_name: str
) -> None:
    counts = {code: int((status == code).sum()) for code in (_INVALID, _OUTSIDE, _CLIPPED)}
    parts = []
    if counts[_INVALID]:
        parts.append(
            f"dropped {counts[_INVALID]} annotation(s) with a malformed, non-finite, negative- "
            "or zero-size box"
        )
    if bad_segmentation_ids:
        parts.append(
            f"dropped {len(bad_segmentation_ids)} annotation(s) with a missing, empty or malformed "
            f"segmentation (annotation ids {bad_segmentation_ids[:10]})"
        )
    size = f"{image_hw[1]}x{image_hw[0]} (WxH)"
    if counts[_OUTSIDE]:
        parts.append(f"dropped {counts[_OUTSIDE]} box(es) lying entirely outside the {size} image")
    if counts[_CLIPPED]:
        parts.append(f"clipped {counts[_CLIPPED]} box(es) reaching beyond the {size} image")
    if parts:
        logger.warning("'%s': %s", file_name, "; ".join(parts))


def _contains_crop(augmentations) -> bool:
    for aug in augmentations:
        if isinstance(aug, (T.RandomCrop, T.CropTransform)):
            return True
        if isinstance(aug, RandomChoiceOfAugmentations):
            if any(_contains_crop(choice.augs) for choice in aug.choices):
                return True
        if isinstance(aug, T.AugmentationList) and _contains_crop(aug.augs):
            return True
    return False


def _clean_segmentation(segmentation, image_hw: Sequence[int]):
    """A COCO segmentation usable at image size (H0, W0), or None.

    Polygons: the list of those with an even number (>= 6) of finite coordinates, as float lists
    (None when none is left; detectron2's ``load_coco_json`` drops short polygons the same way).
    RLE: compressed RLE (uncompressed "counts" lists are compressed) whose size is (H0, W0).
    """
    try:
        if isinstance(segmentation, list):
            polygons = [np.asarray(p, dtype=np.float64).reshape(-1) for p in segmentation]
            polygons = [
                p.tolist()
                for p in polygons
                if len(p) >= 6 and len(p) % 2 == 0 and np.isfinite(p).all()
            ]
            return polygons or None
        if isinstance(segmentation, dict):
            height, width = (int(v) for v in segmentation["size"])
            if (height, width) != tuple(int(v) for v in image_hw):
                return None
            if isinstance(segmentation["counts"], list):
                counts = np.asarray(segmentation["counts"])
                if counts.ndim != 1 or (counts < 0).any() or counts.sum() != height * width:
                    return None
                return mask_util.frPyObjects(segmentation, height, width)
            if isinstance(segmentation["counts"], (str, bytes)):
                # Counts that add up to less than H*W decode "fine" with the rest of the mask
                # taken from uninitialised memory; more than H*W raise in decode. A valid RLE
                # re-encodes to itself (pycocotools writes canonical RLE; its decode checks the
                # upper bound, the round trip the lower one).
                counts = segmentation["counts"]
                counts = counts.encode() if isinstance(counts, str) else counts
                rle = {"size": [height, width], "counts": counts}
                if mask_util.encode(np.asfortranarray(mask_util.decode(rle)))["counts"] != counts:
                    return None
                return segmentation
    except (KeyError, TypeError, ValueError):
        pass
    return None


def _polygons_to_rle(segmentation, image_hw: Sequence[int]):
    """Polygon list -> one COCO RLE dict at image size (H0, W0); RLE dicts pass through."""
    if not isinstance(segmentation, list):
        return segmentation
    polygons = [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in segmentation]
    return mask_util.merge(mask_util.frPyObjects(polygons, int(image_hw[0]), int(image_hw[1])))
