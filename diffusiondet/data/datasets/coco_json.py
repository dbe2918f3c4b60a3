"""Register a user's COCO-format json (instances) as a detectron2 dataset, with clear errors.

Wraps detectron2's ``load_coco_json``: category ids in the json (any ids) are mapped to contiguous
0..K-1 at load time and boxes are abs xywh (``BoxMode.XYWH_ABS``) in the loaded dicts.
"""
import json
import logging
import os
from typing import Dict, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = ["check_coco_dict", "register_coco_json", "validate_coco_json"]

logger = logging.getLogger(__name__)

# Images checked for existence by validate_coco_json: enough to catch a wrong image_root early
# without stat-ing a whole large dataset at start-up.
_NUM_IMAGES_PROBED = 5
# abspath -> (mtime_ns, size) of jsons whose structure passed check_coco_dict in this process.
_CHECKED: Dict[str, Tuple[int, int]] = {}


def validate_coco_json(json_file: str, image_root: str, allow_outside_root: bool = False) -> int:
    """Check that a COCO json and its image folder are usable, and count its categories.

    Args:
        json_file: path of a COCO instances json.
        image_root: folder that the json's ``images[].file_name`` are relative to.

    Returns:
        K, the number of entries in ``categories`` (what ``NUM_CLASSES`` must be).

    Raises:
        FileNotFoundError: the json or the image folder is missing, or none of the first few
            listed images exists under ``image_root`` (a wrong root); the message names the path.
        ValueError: the json does not parse or is not a COCO instances json (see
            :func:`check_coco_dict`); the message names the file and the offending id or key.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: '{json_file}'")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"Image folder not found: '{image_root}' (for '{json_file}')")
    coco = _read_json(json_file)
    num_categories = check_coco_dict(coco, json_file, allow_outside_root)

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
    _CHECKED[os.path.abspath(json_file)] = _file_stamp(json_file)
    return num_categories


def check_coco_dict(coco, json_file: str = "<json>", allow_outside_root: bool = False) -> int:
    """Check the structure of a parsed COCO instances json; return its number of categories.

    Errors that detectron2 / pycocotools would otherwise hit with an anonymous assertion, or not
    at all (duplicate image ids silently merge two images' annotations into one), raise
    ``ValueError`` naming ``json_file`` and the id or key: a top level that is not an object
    with ``images`` / ``annotations`` / ``categories`` lists, an empty ``categories``, entries
    lacking required keys, duplicate image / annotation / category ids, and annotations whose
    ``category_id`` is not in ``categories``. Annotations of unlisted images are only logged
    (detectron2 ignores them).
    """
    where = f"'{json_file}'"
    if not isinstance(coco, dict):
        raise ValueError(
            f"{where} is not a COCO instances json: its top level is a {type(coco).__name__}, "
            "expected an object with 'images', 'annotations' and 'categories'"
        )
    missing_keys = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing_keys:
        raise ValueError(f"{where} is not a COCO instances json: missing {missing_keys}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise ValueError(f"{where}: '{key}' must be a list, got {type(coco[key]).__name__}")
    if not coco["categories"]:
        raise ValueError(f"{where} has an empty 'categories' list")
    _check_entries(coco, "images", ("id", "file_name", "height", "width"), where)
    _check_entries(coco, "categories", ("id", "name"), where)
    _check_entries(coco, "annotations", ("id", "image_id", "category_id"), where)

    known = {c["id"] for c in coco["categories"]}
    annotations = coco["annotations"]
    unknown = _first_ids(a["category_id"] for a in annotations if a["category_id"] not in known)
    if unknown:
        raise ValueError(
            f"{where}: annotations use category_id {unknown} that is not in 'categories' "
            f"(ids {sorted(known, key=str)[:10]})"
        )
    image_ids = {im["id"] for im in coco["images"]}
    orphans = _first_ids(a["image_id"] for a in annotations if a["image_id"] not in image_ids)
    if orphans:
        logger.warning("%s: annotations of image_id %s not in 'images' are ignored", where, orphans)
    if not allow_outside_root:
        _check_inside_root(coco["images"], where)
    _warn_about_short_polygons(annotations, where)
    return len(coco["categories"])


def _check_inside_root(images, where: str) -> None:
    """A file_name that is absolute or climbs with '..' reads a file outside the image folder
    (os.path.join(root, "/etc/passwd") is "/etc/passwd"): an error naming it, unless
    DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT."""
    for im in images:
        name = str(im["file_name"])
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise ValueError(
                f"{where}: image id {im['id']} has file_name '{name}', which leaves the image folder;"
                " set DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT True if that is intended"
            )


def _warn_about_short_polygons(annotations, where: str) -> None:
    """detectron2's loader drops polygons of fewer than 3 points (and ``[[]]``) with one aggregate
    count naming no file; name the file and the annotation ids here."""
    short = [
        a["id"] for a in annotations
        if isinstance(a.get("segmentation"), list)
        and any(not isinstance(p, list) or len(p) < 6 for p in a["segmentation"])
    ]
    if short:
        logger.warning(
            "%s: %d annotation(s) have an empty polygon or one of fewer than 3 points (ids %s);"
            " those polygons are dropped, and the annotation too when none is left",
            where, len(short), _first_ids(short),
        )


def _check_entries(coco: dict, key: str, required, where: str) -> None:
    seen, duplicates = set(), []
    for index, entry in enumerate(coco[key]):
        lacking = [k for k in required if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise ValueError(f"{where}: {key}[{index}] lacks {lacking}: {str(entry)[:80]}")
        if entry["id"] in seen:
            duplicates.append(entry["id"])
        seen.add(entry["id"])
    if duplicates:
        raise ValueError(
            f"{where}: duplicate {key} id {_first_ids(duplicates)} ({len(duplicates)} repeated "
            f"entr{'y' if len(duplicates) == 1 else 'ies'}); ids must be unique"
        )


def _first_ids(ids, limit: int = 5):
    """The first ``limit`` distinct ids, as a list (for messages)."""
    first = []
    for i in ids:
        if i not in first:
            first.append(i)
            if len(first) == limit:
                break
    return first


def _read_json(json_file: str):
    try:
        with open(json_file) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"'{json_file}' is not valid json: {e}") from e


def _file_stamp(path: str):
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def register_coco_json(
    name: str,
    json_file: str,
    image_root: str,
    *,
    evaluator_type: str = "coco",
    metadata: Optional[dict] = None,
    allow_outside_root: bool = False,
) -> None:
    """Register ``name`` in detectron2's DatasetCatalog / MetadataCatalog.

    Loading (``DatasetCatalog.get(name)``) returns detectron2 dataset dicts with contiguous
    category ids 0..K-1, abs xywh boxes and polygon/RLE segmentations (crowd objects kept with
    ``iscrowd=1``); it raises ``FileNotFoundError`` naming the missing json or image folder and
    ``ValueError`` for a json that fails :func:`check_coco_dict`.

    Args:
        name: dataset name.
        json_file: COCO instances json; also stored as metadata ``json_file``, which detectron2's
            COCOEvaluator reads.
        image_root: folder containing the images.
        evaluator_type: metadata ``evaluator_type`` used to pick an evaluator.
        metadata: extra metadata (e.g. ``thing_classes``) set at registration time.
        allow_outside_root: accept ``file_name``s that are absolute or contain ``..``
            (DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT); otherwise loading raises ValueError naming them.

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
        # Checked here too (once per file version) because pycocotools silently merges duplicate
        # image ids; validate_coco_json already did it for DATASETS.CUSTOM files.
        if _CHECKED.get(os.path.abspath(json_file)) != _file_stamp(json_file):
            check_coco_dict(_read_json(json_file), json_file, allow_outside_root)
            _CHECKED[os.path.abspath(json_file)] = _file_stamp(json_file)
        # "id" too: a training-time skip of a bad mask names its annotation, not just the image.
        return load_coco_json(json_file, image_root, dataset_name=name, extra_annotation_keys=["id"])

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
