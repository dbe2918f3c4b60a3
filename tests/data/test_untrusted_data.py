"""Data that is quietly wrong: RLE counts that do not add up to H*W, polygons of fewer than 3
points, file_names leaving the image folder, images whose resize gives a zero side."""
import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import transforms as T
from PIL import Image

from diffusiondet.data import DiffusionDetDatasetMapper
from diffusiondet.data.dataset_mapper import ImageLoadError
from diffusiondet.data.datasets.coco_json import check_coco_dict
from diffusiondet.data.datasets.custom import register_custom_datasets
from tests.utils import tiny_cfg


def _rle_with_total(height, width, delta):
    """Compressed RLE of an (H, W) mask whose counts add up to H*W + delta."""
    counts = [height * width // 2, height * width - height * width // 2 + delta]
    return mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def _sample(tmp_path, segmentation, size=(40, 30)):
    path = str(tmp_path / "a.png")
    Image.new("RGB", size).save(path)
    anno = {"id": 77, "bbox": [2, 2, 10, 10], "bbox_mode": 1, "category_id": 0, "segmentation": segmentation}
    return {"file_name": path, "height": size[1], "width": size[0], "image_id": 1, "annotations": [anno]}


def _mapper(is_train=True, size=32):
    return DiffusionDetDatasetMapper(is_train, augmentations=[T.ResizeShortestEdge(size, 1000)],
                                     mask_on=True, mask_format="bitmask")


@pytest.mark.parametrize("delta", [-5, 7])
def test_rle_whose_counts_do_not_add_up_is_dropped_naming_file_and_annotation(tmp_path, caplog, delta):
    sample = _sample(tmp_path, _rle_with_total(30, 40, delta))
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        out = _mapper()(sample)
    assert len(out["instances"]) == 0
    assert "a.png" in caplog.text and "annotation ids [77]" in caplog.text


def test_valid_rle_is_kept(tmp_path):
    out = _mapper()(_sample(tmp_path, _rle_with_total(30, 40, 0)))
    assert len(out["instances"]) == 1


def test_short_polygons_are_named_at_registration(caplog):
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 4, "width": 4}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "segmentation": [[0, 0, 1, 1]]},
                            {"id": 6, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2],
                             "segmentation": [[]]}]}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        check_coco_dict(coco, "train.json")
    assert "train.json" in caplog.text and "ids [5, 6]" in caplog.text


@pytest.mark.parametrize("name", ["../outside/secret.png", "/etc/passwd"])
def test_file_name_leaving_the_image_folder_is_an_error_unless_allowed(tmp_path, name):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    coco = {"images": [{"id": 1, "file_name": "ok.png", "height": 8, "width": 8},
                       {"id": 2, "file_name": name, "height": 8, "width": 8}],
            "categories": [{"id": 1, "name": "x"}], "annotations": []}  # fmt: skip
    json_file = tmp_path / "train.json"
    json_file.write_text(json.dumps(coco))
    opts = ["DATASETS.CUSTOM.TRAIN_JSON", str(json_file), "DATASETS.CUSTOM.TRAIN_IMAGES", str(images)]
    with pytest.raises(ValueError, match=f"image id 2 has file_name '{name}'.*ALLOW_OUTSIDE_IMAGE_ROOT"):
        register_custom_datasets(tiny_cfg(*opts))
    json_file.write_text(json.dumps(coco) + " ")  # another version of the file: checked again
    try:
        register_custom_datasets(tiny_cfg(*opts, "DATASETS.ALLOW_OUTSIDE_IMAGE_ROOT", True))
    finally:  # custom_train is a process-wide name
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if "custom_train" in DatasetCatalog.list():
            DatasetCatalog.remove("custom_train")
            MetadataCatalog.remove("custom_train")


def test_image_whose_resize_has_a_zero_side_is_skipped_in_training_and_an_error_in_evaluation(tmp_path, caplog):
    path = str(tmp_path / "line.png")
    Image.fromarray(np.zeros((1, 3000, 3), np.uint8)).save(path)
    sample = {"file_name": path, "height": 1, "width": 3000, "image_id": 1, "annotations": []}
    with caplog.at_level(logging.WARNING, logger="diffusiondet"):
        assert _mapper(True, size=8)(sample) is None
    assert "line.png" in caplog.text and "3000x1" in caplog.text
    with pytest.raises(ImageLoadError, match="line.png"):
        _mapper(False, size=8)(sample)
