"""CrowdHuman: ``.odgt`` annotations -> COCO json, and registration of crowdhuman_{train,val}.

Expected layout under the datasets root (``$DETECTRON2_DATASETS``, default ``datasets``)::

    crowdhuman/
      annotation_train.odgt   annotation_val.odgt     (from the CrowdHuman release)
      Images/                 every .jpg of CrowdHuman_train01-03.zip and CrowdHuman_val.zip
      annotations/train.json  annotations/val.json     (written by datasets/prepare_crowdhuman.py)

Conversion (full-body protocol, as CrowdDet / Sparse R-CNN): one category ``person`` (id 1); each
GT box's ``fbox`` ``[x, y, w, h]`` is the COCO ``bbox`` (kept as is, it may reach outside the
image: the mapper and the metric clip); ``mask`` regions and boxes with ``extra.ignore`` become
``iscrowd = 1`` (not trained on, ignore regions in evaluation); the visible box ``vbox`` is kept
as ``bbox_vis`` and the head box ``hbox`` as ``bbox_head``. Image sizes are read from the files.
"""
import json
import os
from typing import Dict, Optional

from PIL import Image

from .coco_json import register_coco_json

__all__ = ["CROWDHUMAN_SPLITS", "odgt_to_coco", "register_crowdhuman"]

# dataset name -> split
CROWDHUMAN_SPLITS = {"crowdhuman_train": "train", "crowdhuman_val": "val"}


def odgt_to_coco(odgt_file: str, image_dir: str) -> dict:
    """COCO instances dict of an odgt file whose images ``<ID>.jpg`` lie in ``image_dir``.

    Raises ``ValueError`` naming the file and line for a malformed record and
    ``FileNotFoundError`` naming a missing image.
    """
    images, annotations = [], []
    with open(odgt_file) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    for image_id, (number, line) in enumerate(lines, 1):
        where = f"{odgt_file}:{number}"
        try:
            record = json.loads(line)
            name = f"{record['ID']}.jpg"
            boxes = record.get("gtboxes", [])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: not an odgt record with an 'ID' ({type(e).__name__}: {e})") from e
        path = os.path.join(image_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image '{path}' not found")
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for box in boxes:
            try:
                x, y, w, h = (float(v) for v in box["fbox"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: a gtbox without a 4-number 'fbox' ({e})") from e
            extra = box.get("extra") or {}
            crowd = box.get("tag") != "person" or bool(extra.get("ignore", 0))
            annotation = {
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(crowd),
            }  # fmt: skip
            for key, coco_key in (("vbox", "bbox_vis"), ("hbox", "bbox_head")):
                if key in box:
                    annotation[coco_key] = [float(v) for v in box[key]]
            annotations.append(annotation)
    categories = [{"id": 1, "name": "person", "supercategory": "person"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def split_paths(root: str, split: str) -> Dict[str, str]:
    base = os.path.join(root, "crowdhuman")
    return {
        "odgt_file": os.path.join(base, f"annotation_{split}.odgt"),
        "json_file": os.path.join(base, "annotations", f"{split}.json"),
        "image_root": os.path.join(base, "Images"),
    }


def register_crowdhuman(root: str, splits: Optional[Dict[str, str]] = None) -> None:
    """Register crowdhuman_train / crowdhuman_val (lazy: files are needed only when loaded).

    Metadata: ``thing_classes`` ["person"], ``evaluator_type`` "crowdhuman", ``json_file``,
    ``image_root`` and ``odgt_file`` (the ground truth of the CrowdHuman metric).
    """
    for name, split in (splits or CROWDHUMAN_SPLITS).items():
        paths = split_paths(root, split)
        register_coco_json(
            name, paths["json_file"], paths["image_root"], evaluator_type="crowdhuman",
            metadata={"thing_classes": ["person"], "odgt_file": paths["odgt_file"]},
        )  # fmt: skip
