#!/usr/bin/env python
"""Convert one split of a Pascal VOC tree into a COCO instances json (boxes only).

Expected tree (e.g. BCCD)::

    <voc_root>/Annotations/<id>.xml
    <voc_root>/JPEGImages/<id>.jpg
    <voc_root>/ImageSets/Main/<split>.txt     one image id per line

Box convention: VOC corners are 1-based inclusive pixel indices, so (as detectron2's VOC loader)
COCO abs xywh = [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1], clipped to the image.
Degenerate boxes (xmax <= xmin or ymax <= ymin; BCCD has two point-like RBC boxes) are dropped
with a warning naming the file. Category ids are 1..K in sorted class-name order over ALL xml
files (not only the split), so every split of one tree gets the same ids.

Example::

    python datasets/convert_voc_to_coco.py --voc-root datasets/BCCD --split train \\
        --output datasets/BCCD/annotations/train.json

then train with ``DATASETS.CUSTOM.TRAIN_JSON datasets/BCCD/annotations/train.json
DATASETS.CUSTOM.TRAIN_IMAGES datasets/BCCD/JPEGImages`` (see datasets/README.md).
"""
import argparse
import glob
import json
import logging
import os
import sys
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence

logger = logging.getLogger("convert_voc_to_coco")


def find_classes(annotation_dir: str) -> List[str]:
    """Sorted object class names found in every xml file of ``annotation_dir``."""
    names = set()
    for path in glob.glob(os.path.join(annotation_dir, "*.xml")):
        objects = ET.parse(path).getroot().iter("object")
        names.update(obj.findtext("name").strip() for obj in objects)
    return sorted(names)


def _image_file(image_dir: str, image_id: str, xml_filename: Optional[str]) -> Optional[str]:
    candidates = [xml_filename] if xml_filename else []
    candidates += [image_id + ext for ext in (".jpg", ".png", ".jpeg")]
    return next((c for c in candidates if os.path.isfile(os.path.join(image_dir, c))), None)


def _image_size(root: ET.Element, image_path: str):
    width, height = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
    if width <= 0 or height <= 0:
        from PIL import Image  # only for xml files without a usable <size>

        with Image.open(image_path) as im:
            width, height = im.size
    return width, height


def convert_voc_split(
    voc_root: str, split: str, classes: Optional[Sequence[str]] = None, difficult: str = "keep"
) -> dict:
    """Build the COCO dict of one split.

    Args:
        voc_root: folder holding Annotations/, JPEGImages/ and ImageSets/Main/.
        split: name of the ImageSets/Main/<split>.txt list.
        classes: class names in id order (ids 1..K); default: :func:`find_classes`. Objects of
            other classes are skipped with a warning.
        difficult: what to do with ``<difficult>1</difficult>`` objects: "keep" (normal
            objects), "crowd" (``iscrowd`` 1: ignored by COCO evaluation and training) or "skip".

    Returns:
        COCO instances dict; ``images[].file_name`` is relative to JPEGImages/.
    """
    annotation_dir = os.path.join(voc_root, "Annotations")
    image_dir = os.path.join(voc_root, "JPEGImages")
    list_file = os.path.join(voc_root, "ImageSets", "Main", f"{split}.txt")
    for path in (annotation_dir, image_dir, list_file):
        if not os.path.exists(path):
            raise FileNotFoundError(f"VOC path not found: '{path}'")
    classes = list(classes) if classes else find_classes(annotation_dir)
    category_ids = {name: i + 1 for i, name in enumerate(classes)}
    with open(list_file) as f:
        image_ids = [line.split()[0] for line in f if line.strip()]

    images, annotations = [], []
    for image_id in image_ids:
        xml_path = os.path.join(annotation_dir, f"{image_id}.xml")
        if not os.path.isfile(xml_path):
            logger.warning("Skipping '%s': annotation file '%s' is missing", image_id, xml_path)
            continue
        root = ET.parse(xml_path).getroot()
        file_name = _image_file(image_dir, image_id, (root.findtext("filename") or "").strip())
        if file_name is None:
            logger.warning("Skipping '%s': no image for it in '%s'", image_id, image_dir)
            continue
        width, height = _image_size(root, os.path.join(image_dir, file_name))
        coco_image_id = len(images) + 1
        images.append(
            {"id": coco_image_id, "file_name": file_name, "width": width, "height": height}
        )
        for obj in root.iter("object"):
            name = obj.findtext("name").strip()
            if name not in category_ids:
                logger.warning("%s: skipping object of unknown class '%s'", xml_path, name)
                continue
            is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if is_difficult and difficult == "skip":
                continue
            corners = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            xmin, ymin, xmax, ymax = corners
            if xmax <= xmin or ymax <= ymin:
                logger.warning("%s: dropping zero-size '%s' box %s", xml_path, name, corners)
                continue
            x0, y0 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
            x1, y1 = min(xmax, float(width)), min(ymax, float(height))
            if (x0, y0, x1, y1) != (xmin - 1.0, ymin - 1.0, xmax, ymax):
                logger.warning("%s: clipped '%s' box %s to the image", xml_path, name, corners)
            if x1 <= x0 or y1 <= y0:
                continue
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": coco_image_id,
                    "category_id": category_ids[name],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": int(is_difficult and difficult == "crowd"),
                }
            )
    return {
        "info": {"description": f"Pascal VOC '{split}' split of {os.path.abspath(voc_root)}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name} for name, i in category_ids.items()],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--voc-root", required=True, help="folder with Annotations/, JPEGImages/, ImageSets/"
    )
    parser.add_argument("--split", required=True, help="ImageSets/Main/<split>.txt, e.g. train")
    parser.add_argument("--output", required=True, help="COCO json to write")
    parser.add_argument("--classes", default="", help="comma-separated class names in id order")
    parser.add_argument("--difficult", choices=("keep", "crowd", "skip"), default="keep")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] or None
    coco = convert_voc_split(args.voc_root, args.split, classes=classes, difficult=args.difficult)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(coco, f)
    logger.info(
        "Wrote %s: %d images, %d boxes, classes %s",
        args.output,
        len(coco["images"]),
        len(coco["annotations"]),
        [c["name"] for c in coco["categories"]],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
