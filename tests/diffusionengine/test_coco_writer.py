"""GeneratedCocoWriter: a valid COCO json that loads back equal, atomic files, resume, categories."""
import json
import os

import cv2
import numpy as np
import pytest

from diffusiondet.data.datasets.coco_json import validate_coco_json
from diffusionengine.data.coco_writer import GeneratedCocoWriter, reference_categories

# Non-contiguous ids, as in COCO: contiguous class c is the c-th category by increasing id.
CATEGORIES = [{"id": 7, "name": "green_square"}, {"id": 3, "name": "red_circle", "supercategory": "shape"}]
RECORD = dict(prompt="a photo, with red circle in the realistic photo.", seed=11, strength=0.6,
              guidance=7.5, steps=4, scheduler="ddim", t=1, reference=None)  # fmt: skip


def _image(seed, h=24, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write_two(writer):
    writer.add(_image(0), [[1.0, 2.0, 11.5, 8.25], [0, 0, 40, 24]], [1, 0], [0.91, 0.4], **RECORD)
    writer.add(_image(1), np.zeros((0, 4)), [], [], **{**RECORD, "seed": 12, "reference": "000042.jpg"})
    return writer.flush()


def test_json_is_valid_coco_and_loads_back_equal(tmp_path):
    writer = GeneratedCocoWriter(tmp_path, CATEGORIES)
    json_file = _write_two(writer)
    assert json_file == os.path.join(tmp_path, "annotations.json")
    assert validate_coco_json(json_file, os.path.join(tmp_path, "images")) == 2
    with open(json_file) as f:
        coco = json.load(f)
    assert coco == json.loads(json.dumps(writer.to_dict()))
    assert [c["id"] for c in coco["categories"]] == [3, 7]
    assert [im["id"] for im in coco["images"]] == [1, 2]
    assert [im["file_name"] for im in coco["images"]] == ["000001.png", "000002.png"]
    first = coco["images"][0]
    assert (first["height"], first["width"]) == (24, 40)
    assert {k: first[k] for k in RECORD} == RECORD
    assert coco["images"][1]["reference"] == "000042.jpg"
    a, b = coco["annotations"]
    assert (a["id"], a["image_id"], b["id"]) == (1, 1, 2)
    # contiguous 1 -> second category by id (7), 0 -> 3; xyxy -> xywh
    assert (a["category_id"], b["category_id"]) == (7, 3)
    assert a["bbox"] == [1.0, 2.0, 10.5, 6.25] and a["area"] == pytest.approx(65.62, abs=0.01)
    assert a["score"] == 0.91 and a["iscrowd"] == 0
    assert writer.class_counts == [1, 1]
    # The image is the RGB array given, losslessly.
    loaded = cv2.imread(os.path.join(tmp_path, "images", "000001.png"))[:, :, ::-1]
    np.testing.assert_array_equal(loaded, _image(0))


def test_detectron2_loads_the_generated_set_with_the_reference_ids(tmp_path):
    from detectron2.data import DatasetCatalog
    from diffusiondet.data.datasets import register_coco_json

    _write_two(GeneratedCocoWriter(tmp_path, CATEGORIES))
    register_coco_json("coco_writer_test_set", str(tmp_path / "annotations.json"), str(tmp_path / "images"))
    records = DatasetCatalog.get("coco_writer_test_set")
    assert [len(r["annotations"]) for r in records] == [2, 0]
    assert [a["category_id"] for a in records[0]["annotations"]] == [1, 0]  # back to contiguous


def test_resume_continues_numbering_and_counts(tmp_path):
    one_shot = GeneratedCocoWriter(tmp_path / "a", CATEGORIES)
    for i in range(3):
        one_shot.add(_image(i), [[0, 0, 5, 5]], [i % 2], [0.5], **RECORD)
    one_shot.flush()

    first = GeneratedCocoWriter(tmp_path / "b", CATEGORIES)
    for i in range(2):
        first.add(_image(i), [[0, 0, 5, 5]], [i % 2], [0.5], **RECORD)
    first.flush()
    first.add(_image(9), [[0, 0, 5, 5]], [0], [0.5], **RECORD)  # an orphan image: never flushed
    with pytest.raises(FileExistsError, match="resume"):
        GeneratedCocoWriter(tmp_path / "b", CATEGORIES)
    resumed = GeneratedCocoWriter(tmp_path / "b", CATEGORIES, resume=True)
    assert resumed.num_images == 2 and resumed.class_counts == [1, 1]
    assert resumed.add(_image(2), [[0, 0, 5, 5]], [0], [0.5], **RECORD) == 3
    resumed.flush()
    for name in ("annotations.json", "images/000001.png", "images/000002.png", "images/000003.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_resuming_with_other_categories_is_an_error_naming_both(tmp_path):
    GeneratedCocoWriter(tmp_path, CATEGORIES).flush()
    with pytest.raises(ValueError, match=r"other categories.*'red_circle'.*'person'"):
        GeneratedCocoWriter(tmp_path, [{"id": 3, "name": "red_circle"}, {"id": 7, "name": "person"}], resume=True)


def test_writes_leave_no_temporary_files_and_bad_inputs_are_errors(tmp_path):
    writer = GeneratedCocoWriter(tmp_path, CATEGORIES)
    _write_two(writer)
    assert sorted(os.listdir(tmp_path)) == ["annotations.json", "images"]
    assert sorted(os.listdir(tmp_path / "images")) == ["000001.png", "000002.png"]
    with pytest.raises(ValueError, match="class ids"):
        writer.add(_image(0), [[0, 0, 1, 1]], [2], [0.5])
    with pytest.raises(TypeError, match="unknown image record fields"):
        writer.add(_image(0), [], [], [], promt="typo")
    with pytest.raises(ValueError, match="uint8"):
        writer.add(_image(0).astype(np.float32), [], [], [])


def test_reference_categories_come_from_the_registered_json(tmp_path):
    from detectron2.data import MetadataCatalog
    from diffusiondet.data.datasets import register_coco_json

    _write_two(GeneratedCocoWriter(tmp_path, CATEGORIES))
    register_coco_json("coco_writer_reference", str(tmp_path / "annotations.json"), str(tmp_path / "images"))
    assert reference_categories("coco_writer_reference") == [
        {"id": 3, "name": "red_circle", "supercategory": "shape"}, {"id": 7, "name": "green_square"}]  # fmt: skip
    MetadataCatalog.get("coco_writer_names_only").set(thing_classes=["a", "b"])
    assert reference_categories("coco_writer_names_only") == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
