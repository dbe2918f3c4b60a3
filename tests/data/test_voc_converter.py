"""datasets/convert_voc_to_coco.py on a tiny VOC tree built in a temporary folder."""
import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
from PIL import Image

from diffusiondet.data.datasets import validate_coco_json

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "datasets", "convert_voc_to_coco.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("convert_voc_to_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _xml(filename, width, height, objects):
    body = "".join(
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for name, b, difficult in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{body}</annotation>"
    )


@pytest.fixture
def voc_root(tmp_path):
    """Two 64x48 images; img_b has one zero-size box, one difficult box and one past the edge."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / sub).mkdir(parents=True)
    objects = {
        "img_a": [("dog", (11, 21, 30, 40), 0), ("cat", (1, 1, 10, 10), 0)],
        "img_b": [
            ("cat", (20, 20, 20, 20), 0),
            ("dog", (5, 6, 15, 16), 1),
            ("cat", (50, 40, 70, 48), 0),
        ],
    }
    for image_id, objs in objects.items():
        Image.new("RGB", (64, 48), (128, 0, 0)).save(tmp_path / "JPEGImages" / f"{image_id}.jpg")
        xml = _xml(f"{image_id}.jpg", 64, 48, objs)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(xml)
    (tmp_path / "ImageSets/Main/train.txt").write_text("img_a\nimg_b\n")
    (tmp_path / "ImageSets/Main/val.txt").write_text("img_b\n")
    return tmp_path


def test_converts_split_and_filters_zero_size_box(voc_root, tmp_path, caplog):
    output = tmp_path / "out" / "train.json"
    with caplog.at_level(logging.WARNING):
        args = ["--voc-root", str(voc_root), "--split", "train", "--output", str(output)]
        assert _load_script().main(args) == 0
    coco = json.loads(output.read_text())

    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [c["id"] for c in coco["categories"]] == [1, 2]
    assert [(im["id"], im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        (1, "img_a.jpg", 64, 48),
        (2, "img_b.jpg", 64, 48),
    ]
    boxes = [
        (a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]
    ]
    assert boxes == [
        (1, 2, [10.0, 20.0, 20.0, 20.0], 0),  # VOC 1-based inclusive -> COCO xywh
        (1, 1, [0.0, 0.0, 10.0, 10.0], 0),
        (2, 2, [4.0, 5.0, 11.0, 11.0], 0),  # difficult kept by default
        (2, 1, [49.0, 39.0, 15.0, 9.0], 0),  # clipped at x = 64
    ]
    assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in coco["annotations"])
    assert "img_b.xml" in caplog.text and "zero-size" in caplog.text
    assert validate_coco_json(str(output), str(voc_root / "JPEGImages")) == 2


def test_class_ids_are_shared_by_splits_and_difficult_modes(voc_root):
    convert = _load_script().convert_voc_split
    val = convert(str(voc_root), "val")
    assert [c["name"] for c in val["categories"]] == ["cat", "dog"]  # from all xml files
    crowd = convert(str(voc_root), "val", difficult="crowd")
    assert [a["iscrowd"] for a in crowd["annotations"]] == [1, 0]
    skipped = convert(str(voc_root), "val", difficult="skip")
    assert [a["category_id"] for a in skipped["annotations"]] == [1]
    only_dog = convert(str(voc_root), "train", classes=["dog"])
    assert [a["category_id"] for a in only_dog["annotations"]] == [1, 1]


def test_missing_split_file_is_a_clear_error(voc_root):
    with pytest.raises(FileNotFoundError, match="test.txt"):
        _load_script().convert_voc_split(str(voc_root), "test")


def test_command_line(voc_root, tmp_path):
    output = tmp_path / "val.json"
    cmd = [sys.executable, SCRIPT, "--voc-root", str(voc_root), "--split", "val"]
    cmd += ["--output", str(output)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(output.read_text())["images"]) == 1
