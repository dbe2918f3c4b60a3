"""Write generated images and their labels as a COCO instances dataset, resumably.

Layout of a generated folder::

    <out_dir>/images/000001.png ...   RGB images
    <out_dir>/annotations.json        COCO instances json

The categories are those of the reference (real) training json, same ids and names, so the
generated set trains next to the real one without a remap pass (the public DiffusionEngine code
remaps afterwards, docs/diffusion_engine.md §1.3). Image ids and annotation ids run from 1 in
writing order. Every image record also carries how it was generated (:data:`RECORD_FIELDS`).

Every file is written to a temporary name in its folder and renamed into place (``os.replace``),
so a killed run leaves complete files only; the json is the state of the folder: images past its
last record are orphans that a resumed run overwrites with the same numbers.

Shape shorthand: M labels of one image; boxes are abs xyxy in pixels (written as COCO abs xywh).
"""
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

__all__ = [
    "ANNOTATIONS_FILE",
    "IMAGES_DIR",
    "RECORD_FIELDS",
    "GeneratedCocoWriter",
    "reference_categories",
]

ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
# Generation parameters stored in every image record (None where not applicable, e.g. no
# reference image for text-to-image).
RECORD_FIELDS = ("prompt", "seed", "strength", "guidance", "steps", "scheduler", "t", "reference")
# Boxes and scores are stored to 1/100 px (and 1e-4): exact enough, and a json a third the size.
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 4


def reference_categories(dataset_name: str) -> List[dict]:
    """COCO ``categories`` (id, name[, supercategory]) of a registered dataset, by increasing id.

    Read from the dataset's json (metadata ``json_file``) when it has one, else from the metadata
    ``thing_dataset_id_to_contiguous_id`` / ``thing_classes`` (ids 1..K when only names exist).
    """
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    json_file = meta.get("json_file")
    if json_file and os.path.isfile(json_file):
        with open(json_file) as f:
            categories = json.load(f).get("categories") or []
        if categories:
            keep = ("id", "name", "supercategory")
            return sorted(({k: c[k] for k in keep if k in c} for c in categories), key=lambda c: c["id"])
    names = meta.get("thing_classes")
    if not names:
        raise ValueError(
            f"dataset '{dataset_name}' has neither a json_file with categories nor thing_classes in"
            " its metadata: cannot copy its categories"
        )
    id_map = meta.get("thing_dataset_id_to_contiguous_id") or {k + 1: k for k in range(len(names))}
    return sorted(({"id": int(i), "name": names[c]} for i, c in id_map.items()), key=lambda c: c["id"])


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _same_categories(a: Sequence[dict], b: Sequence[dict]) -> bool:
    key = lambda cats: sorted((int(c["id"]), str(c["name"])) for c in cats)  # noqa: E731
    return key(a) == key(b)


class GeneratedCocoWriter:
    """Accumulates generated images and labels into ``out_dir`` (see the module docstring).

    Args:
        out_dir: the folder; created if missing.
        categories: COCO categories of the reference dataset (``reference_categories``), each
            with "id" and "name". Contiguous class c (as models predict them) is the c-th
            category by increasing id, as detectron2's ``load_coco_json`` maps them.
        resume: continue a folder that already has an ``annotations.json`` (numbering and
            per-class counts go on from it). Without it, such a folder is an error.
        info: extra fields of the json's "info" object (e.g. the generation settings).

    Raises:
        FileExistsError: ``out_dir`` holds a dataset and ``resume`` is False.
        ValueError: resuming a folder written with other categories (both lists named).
    """

    def __init__(self, out_dir: str, categories: Sequence[dict], *, resume: bool = False, info: Optional[dict] = None):
        self.out_dir = os.fspath(out_dir)
        self.json_path = os.path.join(self.out_dir, ANNOTATIONS_FILE)
        self.image_dir = os.path.join(self.out_dir, IMAGES_DIR)
        cats = sorted(({**c, "id": int(c["id"]), "name": str(c["name"])} for c in categories), key=lambda c: c["id"])
        if not cats or len({c["id"] for c in cats}) != len(cats):
            raise ValueError(f"categories must be a non-empty list with distinct ids, got {list(categories)}")
        self.categories = cats
        self.contiguous_to_id = [c["id"] for c in cats]
        self.images: List[dict] = []
        self.annotations: List[dict] = []
        self.info: Dict = {"description": "DiffusionEngine generated dataset"}
        if os.path.isfile(self.json_path):
            if not resume:
                raise FileExistsError(
                    f"{self.json_path} exists: pass resume (--resume) to continue that dataset, or"
                    " choose another output folder"
                )
            self._load_existing()
        self.info.update(info or {})
        os.makedirs(self.image_dir, exist_ok=True)
        self.class_counts = [0] * len(cats)  # labels written per contiguous class
        index = {cid: k for k, cid in enumerate(self.contiguous_to_id)}
        for a in self.annotations:
            self.class_counts[index[a["category_id"]]] += 1

    def _load_existing(self) -> None:
        with open(self.json_path) as f:
            coco = json.load(f)
        if not _same_categories(coco.get("categories", []), self.categories):
            raise ValueError(
                f"{self.json_path} was written with other categories than the reference dataset's:"
                f" {[(c['id'], c['name']) for c in coco.get('categories', [])]} vs"
                f" {[(c['id'], c['name']) for c in self.categories]}"
            )
        self.images, self.annotations = coco["images"], coco["annotations"]
        self.info.update(coco.get("info") or {})

    @property
    def num_images(self) -> int:
        return len(self.images)

    def add(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        classes: Sequence[int],
        scores: Sequence[float],
        **record,
    ) -> int:
        """Write one image (now) and record its labels (in the json at the next :meth:`flush`).

        Args:
            image: (H, W, 3) uint8 RGB.
            boxes: (M, 4) abs xyxy in pixels of ``image``.
            classes: (M,) contiguous class ids (0..K-1).
            scores: (M,) detector scores, kept as the annotations' "score".
            record: the :data:`RECORD_FIELDS` of this image (missing ones are None); other
                keys are an error (a typo would silently drop a field).

        Returns:
            The new image id.
        """
        unknown = sorted(set(record) - set(RECORD_FIELDS))
        if unknown:
            raise TypeError(f"unknown image record fields {unknown}; expected a subset of {RECORD_FIELDS}")
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        classes = [int(c) for c in np.asarray(classes).reshape(-1)]
        scores = [float(s) for s in np.asarray(scores).reshape(-1)]
        if not len(boxes) == len(classes) == len(scores):
            raise ValueError(f"boxes, classes, scores differ in length: {len(boxes)}, {len(classes)}, {len(scores)}")
        bad = [c for c in classes if not 0 <= c < len(self.categories)]
        if bad:
            raise ValueError(f"class ids {bad} outside 0..{len(self.categories) - 1}")

        image_id = (self.images[-1]["id"] if self.images else 0) + 1
        file_name = f"{image_id:06d}.png"
        ok, png = cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))  # RGB -> BGR for cv2
        if not ok:
            raise OSError(f"could not encode {file_name} as PNG")
        _atomic_write(os.path.join(self.image_dir, file_name), png.tobytes())
        h, w = image.shape[:2]
        fields = {k: record.get(k) for k in RECORD_FIELDS}
        self.images.append({"id": image_id, "file_name": file_name, "height": int(h), "width": int(w), **fields})
        next_ann = (self.annotations[-1]["id"] if self.annotations else 0) + 1
        for k, ((x0, y0, x1, y1), c, s) in enumerate(zip(boxes.tolist(), classes, scores)):
            bw, bh = round(x1 - x0, _BOX_DECIMALS), round(y1 - y0, _BOX_DECIMALS)
            self.annotations.append({
                "id": next_ann + k,
                "image_id": image_id,
                "category_id": self.contiguous_to_id[c],
                "bbox": [round(x0, _BOX_DECIMALS), round(y0, _BOX_DECIMALS), bw, bh],
                "area": round(bw * bh, _BOX_DECIMALS),
                "iscrowd": 0,
                "score": round(s, _SCORE_DECIMALS),
            })  # fmt: skip
            self.class_counts[c] += 1
        return image_id

    def to_dict(self) -> dict:
        """The COCO instances dict the json holds after :meth:`flush`."""
        return {
            "info": self.info,
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": self.categories,
        }

    def flush(self) -> str:
        """Write ``annotations.json`` atomically; returns its path."""
        data = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")
        _atomic_write(self.json_path, data)
        return self.json_path
