"""Register a user's COCO-format json (instances) as a detectron2 dataset, with clear errors.

Wraps detectron2's ``load_coco_json``: category ids in the json (any ids) are mapped to contiguous
0..K-1 at load time and boxes are abs xywh (``BoxMode.XYWH_ABS``) in the loaded dicts.
"""
import json
import logging
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["register_coco_json", "validate_coco_json"]

logger = logging.getLogger(__name__)

# Images checked for existence by validate_coco_json: enough to catch a wrong image_root early
# without stat-ing a whole large dataset at start-up.
_NUM_IMAGES_PROBED = 5


def validate_coco_json(json_file: str, image_root: str) -> int:
    """Check that a COCO json and its image folder are usable, and count its categories.

    Args:
        json_file: path of a COCO instances json.
        image_root: folder that the json's ``images[].file_name`` are relative to.

    Returns:
        K, the number of entries in ``categories`` (what ``NUM_CLASSES`` must be).

    Raises:
        FileNotFoundError: the json or the image folder is missing, or none of the first few
            listed images exists under ``image_root`` (a wrong root); the message names the path.
        ValueError: the json does not parse or lacks ``images`` / ``annotations`` /
            ``categories``, or has no categories.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: '{json_file}'")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image folder not found: '{image_root}' (for '{json_file}')")
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except ValueError as e:
        raise ValueError(f"'{json_file}' is not valid json: {e}") from e
    required = ("images", "annotations", "categories")
    missing_keys = [k for k in required if not isinstance(coco, dict) or k not in coco]
    if missing_keys:
        raise ValueError(f"'{json_file}' is not a COCO instances json: missing {missing_keys}")
    if not coco["categories"]:
        raise ValueError(f"'{json_file}' has an empty 'categories' list")

    probed = [
        os.path.join(image_root, im["file_name"]) for im in coco["images"][:_NUM_IMAGES_PROBED]
    ]
    missing = [p for p in probed if not os.path.isfile(p)]
    if probed and len(missing) == len(probed):
        raise FileNotFoundError(
            f"None of the first {len(probed)} images of '{json_file}' exist, e.g. '{missing[0]}'; "
            f"is the image root '{image_root}' right?"
        )
    for path in missing:
        logger.warning("Image listed in '%s' is missing: '%s'", json_file, path)
    return len(coco["categories"])


def register_coco_json(
    name: str,
    json_file: str,
    image_root: str,
    *,
    evaluator_type: str = "coco",
    metadata: Optional[dict] = None,
) -> None:
    """Register ``name`` in detectron2's DatasetCatalog / MetadataCatalog.

    Loading (``DatasetCatalog.get(name)``) returns detectron2 dataset dicts with contiguous
    category ids 0..K-1, abs xywh boxes and polygon/RLE segmentations; it raises
    ``FileNotFoundError`` naming the missing json or image folder.

    Args:
        name: dataset name.
        json_file: COCO instances json; also stored as metadata ``json_file``, which detectron2's
            COCOEvaluator reads.
        image_root: folder containing the images.
        evaluator_type: metadata ``evaluator_type`` used to pick an evaluator.
        metadata: extra metadata (e.g. ``thing_classes``) set at registration time.

    Registering the same name again with the same paths is a no-op; with different paths it
    raises ``ValueError`` instead of silently keeping either.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        registered = (meta.get("json_file"), meta.get("image_root"))
        if _same_paths(registered, (json_file, image_root)):
            return
        raise ValueError(
            f"Dataset '{name}' is already registered with json_file={registered[0]!r}, "
            f"image_root={registered[1]!r}; refusing to re-register it with "
            f"json_file={json_file!r}, image_root={image_root!r}. Use another name."
        )

    def load():
        for path, kind in ((json_file, "annotation file"), (image_root, "image folder")):
            if not os.path.exists(path):
                raise FileNotFoundError(f"Dataset '{name}': COCO {kind} not found: '{path}'")
        return load_coco_json(json_file, image_root, dataset_name=name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type=evaluator_type,
        **(metadata or {}),
    )


def _same_paths(registered, requested) -> bool:
    return all(
        old is not None and os.path.abspath(old) == os.path.abspath(new)
        for old, new in zip(registered, requested)
    )
