"""Dataset registration: built-in synthetic splits and user COCO json files."""
import json
import os
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

import diffusiondet.data  # noqa: F401  registers the built-in datasets
from diffusiondet.data.datasets import (
    ensure_synthetic_crowd,
    register_all_builtin,
    register_coco_json,
    register_synthetic_crowd,
    validate_coco_json,
)
from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES


@pytest.fixture
def unique_name():
    """A fresh dataset name, unregistered again after the test."""
    names = []

    def make(prefix="tmp"):
        names.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield make
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def _write_coco(root, category_ids=(3, 7)):
    """Two 20x30 images; category ids deliberately not 1..K."""
    image_root = root / "images"
    image_root.mkdir(parents=True)
    images, annotations = [], []
    for image_id in (1, 2):
        Image.new("RGB", (30, 20), (90, 90, 90)).save(image_root / f"{image_id}.jpg")
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 30, "height": 20})
    placements = [(1, category_ids[0]), (1, category_ids[1]), (2, category_ids[1])]
    for ann_id, (image_id, cat) in enumerate(placements, start=1):
        annotations.append(
            {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [2, 3, 10, 8]}
        )
    categories = [{"id": c, "name": f"class{c}"} for c in category_ids]
    json_file = root / "instances.json"
    coco = {"images": images, "annotations": annotations, "categories": categories}
    json_file.write_text(json.dumps(coco))
    return str(json_file), str(image_root)


def test_builtin_synthetic_names_are_registered():
    register_all_builtin()  # a second call must be a no-op, not a double registration
    for name, split in (("synthetic_crowd_train", "train"), ("synthetic_crowd_val", "val")):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(SYNTHETIC_CROWD_CLASSES)
        expected_json = os.path.join("synthetic_crowd", "annotations", f"{split}.json")
        assert meta.json_file.endswith(expected_json)
        assert meta.image_root.endswith(os.path.join("synthetic_crowd", split))


def test_synthetic_registration_generates_and_loads(tmp_path, unique_name):
    name = unique_name("synth")
    register_synthetic_crowd(str(tmp_path), splits={name: ("train", 3)})
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 3
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (160, 160)
        assert len(d["annotations"]) > 0
        for anno in d["annotations"]:
            assert 0 <= anno["category_id"] < len(SYNTHETIC_CROWD_CLASSES)  # contiguous ids
            assert anno["bbox_mode"] == BoxMode.XYWH_ABS
    meta = MetadataCatalog.get(name)
    assert os.path.isfile(meta.json_file) and meta.thing_classes == list(SYNTHETIC_CROWD_CLASSES)
    assert validate_coco_json(meta.json_file, meta.image_root) == len(SYNTHETIC_CROWD_CLASSES)

    register_synthetic_crowd(str(tmp_path), splits={name: ("train", 3)})  # same root: no-op
    with pytest.raises(ValueError, match=name):
        register_synthetic_crowd(str(tmp_path / "elsewhere"), splits={name: ("train", 3)})


def test_ensure_synthetic_crowd_returns_existing_paths(tmp_path):
    splits = {"a_train": ("train", 2), "a_val": ("val", 1)}
    paths = ensure_synthetic_crowd(str(tmp_path), splits=splits)
    assert set(paths) == {"a_train", "a_val"}
    for entry in paths.values():
        assert os.path.isfile(entry["json_file"]) and os.path.isdir(entry["image_root"])
    with open(paths["a_val"]["json_file"]) as f:
        assert len(json.load(f)["images"]) == 1


def test_user_coco_json_registers_and_loads(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    assert validate_coco_json(json_file, image_root) == 2
    name = unique_name()
    register_coco_json(name, json_file, image_root)
    dicts = DatasetCatalog.get(name)
    assert [len(d["annotations"]) for d in dicts] == [2, 1]
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [0, 1]  # 3, 7 -> contiguous
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["class3", "class7"]
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (json_file, image_root, "coco")


def test_reregistering_same_paths_is_noop_and_other_paths_fail(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    name = unique_name()
    register_coco_json(name, json_file, image_root)
    register_coco_json(name, json_file, image_root)
    with pytest.raises(ValueError, match="already registered"):
        register_coco_json(name, str(tmp_path / "other.json"), image_root)


def test_missing_json_gives_clear_errors(tmp_path, unique_name):
    missing = str(tmp_path / "nope" / "instances.json")
    name = unique_name()
    register_coco_json(name, missing, str(tmp_path))  # registration is lazy
    with pytest.raises(FileNotFoundError, match="nope"):
        DatasetCatalog.get(name)
    with pytest.raises(FileNotFoundError, match="nope"):
        validate_coco_json(missing, str(tmp_path))


def test_validate_reports_bad_roots_and_bad_json(tmp_path):
    json_file, image_root = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        validate_coco_json(json_file, str(tmp_path / "missing_dir"))
    with pytest.raises(FileNotFoundError, match="image root"):
        validate_coco_json(json_file, str(tmp_path))  # exists, but holds none of the images

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json"):
        validate_coco_json(str(broken), image_root)
    no_categories = tmp_path / "nocat.json"
    no_categories.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="categories"):
        validate_coco_json(str(no_categories), image_root)


def _rewrite(json_file, edit):
    with open(json_file) as f:
        coco = json.load(f)
    coco = edit(coco) or coco
    with open(json_file, "w") as f:
        json.dump(coco, f)


def _expect_both(json_file, image_root, name, match):
    """validate_coco_json and loading a registered name must both raise ValueError(match)."""
    with pytest.raises(ValueError, match=match):
        validate_coco_json(json_file, image_root)
    register_coco_json(name, json_file, image_root)
    with pytest.raises(ValueError, match=match):
        DatasetCatalog.get(name)


def test_duplicate_image_ids_are_named(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    # Without the check, pycocotools keeps one of the two images and gives it both's annotations.
    _rewrite(json_file, lambda coco: coco["images"][1].update(id=1))
    match = r"instances\.json.*duplicate images id \[1\]"
    _expect_both(json_file, image_root, unique_name(), match)


def test_unknown_category_id_is_named_with_the_file(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    _rewrite(json_file, lambda coco: coco["annotations"][2].update(category_id=42))
    _expect_both(json_file, image_root, unique_name(), r"instances\.json.*category_id \[42\]")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda coco: coco["images"], r"top level is a list"),
        (lambda coco: coco.pop("images") and None, r"missing \['images'\]"),
        (lambda coco: coco.update(annotations={}), r"'annotations' must be a list"),
        (lambda coco: coco["images"][0].pop("height") and None, r"images\[0\] lacks \['height'\]"),
        (lambda coco: coco["annotations"][1].update(id=1), r"duplicate annotations id \[1\]"),
        (lambda coco: coco["categories"][1].update(id=3), r"duplicate categories id \[3\]"),
    ],
    ids=["list", "no_images", "annotations_dict", "no_height", "dup_annotation", "dup_category"],
)
def test_json_that_is_not_coco_is_named(tmp_path, unique_name, edit, match):
    json_file, image_root = _write_coco(tmp_path)
    _rewrite(json_file, edit)
    _expect_both(json_file, image_root, unique_name(), r"instances\.json.*" + match)


def test_json_edited_after_validation_is_checked_again_at_load(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    validate_coco_json(json_file, image_root)
    name = unique_name()
    register_coco_json(name, json_file, image_root)
    assert len(DatasetCatalog.get(name)) == 2
    _rewrite(json_file, lambda coco: coco["images"].append(dict(coco["images"][0])))
    with pytest.raises(ValueError, match=r"duplicate images id \[1\]"):
        DatasetCatalog.get(name)


def test_crowd_objects_stay_in_the_dataset_dicts(tmp_path, unique_name):
    json_file, image_root = _write_coco(tmp_path)
    crowd = {"id": 9, "image_id": 2, "category_id": 3, "iscrowd": 1, "bbox": [1, 1, 8, 6]}
    _rewrite(json_file, lambda coco: coco["annotations"].append(crowd))
    name = unique_name()
    register_coco_json(name, json_file, image_root)
    annos = DatasetCatalog.get(name)[1]["annotations"]
    flags_and_boxes = [(a.get("iscrowd", 0), a["bbox"]) for a in annos]
    assert flags_and_boxes == [(0, [2, 3, 10, 8]), (1, [1, 1, 8, 6])]


def test_annotations_of_unlisted_images_are_logged(tmp_path, caplog):
    json_file, image_root = _write_coco(tmp_path)
    orphan = {"id": 9, "image_id": 77, "category_id": 3, "bbox": [1, 1, 8, 6]}
    _rewrite(json_file, lambda coco: coco["annotations"].append(orphan))
    assert validate_coco_json(json_file, image_root) == 2
    assert "instances.json" in caplog.text and "image_id [77]" in caplog.text
