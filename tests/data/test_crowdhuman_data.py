"""CrowdHuman .odgt -> COCO json, registration, and what training and evaluation see of it."""
import json
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from diffusiondet.data import DiffusionDetDatasetMapper
from diffusiondet.data.datasets import odgt_to_coco, register_crowdhuman
from tests.utils import tiny_cfg

ROOT_DIR = __file__.rsplit("/tests/", 1)[0]
RECORDS = [
    {"ID": "1066405,1b43c0003d37fc94", "gtboxes": [
        {"tag": "person", "fbox": [-10, 5, 30, 70], "vbox": [0, 5, 20, 40], "hbox": [5, 5, 8, 8],
         "extra": {"box_id": 0, "occ": 1}},
        {"tag": "person", "fbox": [40, 10, 20, 50], "vbox": [40, 10, 20, 50],
         "extra": {"box_id": 1, "ignore": 1}},
        {"tag": "mask", "fbox": [70, 0, 25, 30], "vbox": [70, 0, 25, 30], "extra": {"ignore": 1}},
    ]},
    {"ID": "273271,c9db000d5146c15", "gtboxes": [
        {"tag": "person", "fbox": [10, 20, 30, 40], "extra": {"box_id": 0, "occ": 0}},
    ]},
]  # fmt: skip
SIZES = {"1066405,1b43c0003d37fc94": (100, 80), "273271,c9db000d5146c15": (60, 90)}  # (w, h)


@pytest.fixture
def crowdhuman_root(tmp_path):
    base = tmp_path / "crowdhuman"
    (base / "Images").mkdir(parents=True)
    for record in RECORDS:
        w, h = SIZES[record["ID"]]
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(base / "Images" / f"{record['ID']}.jpg")
    for split in ("train", "val"):
        (base / f"annotation_{split}.odgt").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path


def test_odgt_to_coco_fields(crowdhuman_root):
    base = crowdhuman_root / "crowdhuman"
    coco = odgt_to_coco(str(base / "annotation_val.odgt"), str(base / "Images"))
    assert [(im["file_name"], im["width"], im["height"]) for im in coco["images"]] == [
        ("1066405,1b43c0003d37fc94.jpg", 100, 80), ("273271,c9db000d5146c15.jpg", 60, 90)]
    anns = coco["annotations"]
    assert [a["image_id"] for a in anns] == [1, 1, 1, 2]
    assert [a["iscrowd"] for a in anns] == [0, 1, 1, 0]  # extra.ignore and the mask tag
    assert anns[0]["bbox"] == [-10, 5, 30, 70] and anns[0]["area"] == 2100  # fbox, unclipped
    assert anns[0]["bbox_vis"] == [0, 5, 20, 40] and anns[0]["bbox_head"] == [5, 5, 8, 8]
    assert "bbox_head" not in anns[3] and {a["category_id"] for a in anns} == {1}
    assert coco["categories"] == [{"id": 1, "name": "person", "supercategory": "person"}]


def test_bad_odgt_and_missing_image_name_the_culprit(tmp_path):
    (tmp_path / "Images").mkdir()
    bad = tmp_path / "bad.odgt"
    bad.write_text('{"ID": "a", "gtboxes": []}\nnot json\n')
    with pytest.raises(FileNotFoundError, match="a.jpg"):
        odgt_to_coco(str(bad), str(tmp_path / "Images"))
    Image.new("RGB", (8, 6)).save(tmp_path / "Images" / "a.jpg")
    with pytest.raises(ValueError, match=r"bad.odgt:2"):
        odgt_to_coco(str(bad), str(tmp_path / "Images"))


def test_prepare_script_and_registration(crowdhuman_root):
    script = f"{ROOT_DIR}/datasets/prepare_crowdhuman.py"
    run = subprocess.run([sys.executable, script, "--root", str(crowdhuman_root)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT_DIR)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "val: 2 images, 2 persons, 2 ignore regions" in run.stdout
    names = {"crowdhuman_test_train": "train", "crowdhuman_test_val": "val"}
    register_crowdhuman(str(crowdhuman_root), names)
    meta = MetadataCatalog.get("crowdhuman_test_val")
    assert meta.thing_classes == ["person"] and meta.evaluator_type == "crowdhuman"
    assert meta.odgt_file.endswith("crowdhuman/annotation_val.odgt")
    dicts = DatasetCatalog.get("crowdhuman_test_train")
    assert [len(d["annotations"]) for d in dicts] == [3, 1]  # crowd regions kept for evaluation
    assert [a["iscrowd"] for a in dicts[0]["annotations"]] == [0, 1, 1]

    # Training drops the ignore boxes and clips the full-body box to the image.
    cfg = tiny_cfg("INPUT.MIN_SIZE_TRAIN", (80,), "INPUT.MAX_SIZE_TRAIN", 1000, "INPUT.RANDOM_FLIP", "none")
    mapped = DiffusionDetDatasetMapper(cfg, is_train=True)(dicts[0])
    assert mapped["image"].shape[1:] == (80, 100)
    assert mapped["instances"].gt_boxes.tensor.tolist() == [[0.0, 5.0, 20.0, 75.0]]
