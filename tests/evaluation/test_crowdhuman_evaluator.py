"""CrowdHumanEvaluator: detectron2 outputs + registered CrowdHuman dicts -> AP50 / mMR / Recall."""
import json
import os

import pytest
import torch
from detectron2.structures import Boxes, Instances

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.engine import Trainer
from diffusiondet.evaluation import CrowdHumanEvaluator
from diffusiondet.evaluation.crowdhuman import main as crowdhuman_cli
from tests.utils import tiny_cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ch")
    (root / "Images").mkdir()
    coco = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 60, "height": 90},
                   {"id": 3, "file_name": "c.jpg", "width": 50, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-10, 5, 30, 70], "area": 2100, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [60, 0, 40, 40], "area": 1600, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }  # fmt: skip
    (root / "val.json").write_text(json.dumps(coco))
    register_coco_json("crowdhuman_eval_test", str(root / "val.json"), str(root / "Images"),
                       evaluator_type="crowdhuman", metadata={"thing_classes": ["person"]})  # fmt: skip
    return root


def _output(boxes, scores, classes=None):
    inst = Instances((1, 1))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor(scores, dtype=torch.float32)
    inst.pred_classes = torch.tensor(classes or [0] * len(scores), dtype=torch.long)
    return {"instances": inst}


def test_evaluator_metrics_and_saved_detections(dataset, tmp_path, capsys):
    evaluator = Trainer.build_evaluator(tiny_cfg(), "crowdhuman_eval_test", str(tmp_path))
    assert isinstance(evaluator, CrowdHumanEvaluator)
    evaluator.reset()
    # Image 1: the person, clipped to [0, 5, 20, 75], found (0.9); a box in the ignore region
    # (0.95) is dropped. Image 2: an FP (0.8) above the found person (0.7). Image 3 has no GT:
    # not counted, so its detection (0.99) is no FP.
    evaluator.process([{"image_id": 1}], [_output([[0, 5, 20, 75], [65, 5, 95, 35]], [0.9, 0.95])])
    evaluator.process([{"image_id": 2}, {"image_id": 3}],
                      [_output([[0, 0, 5, 5], [10, 20, 40, 60]], [0.8, 0.7]), _output([[1, 1, 9, 9]], [0.99])])
    result = evaluator.evaluate()["crowdhuman"]
    # List: TP .9, FP .8, TP .7 over 2 GT and 2 images: recall .5 .5 1, precision 1 .5 2/3,
    # AP = .5 (2/3 + .5) / 2 = 7/24; FPPI 0, .5, .5: references <= .5 are first reached at
    # position 1 (miss .5), 0.5623 .. 1 never (last position, miss 0): mMR = 0.
    assert result == pytest.approx({"AP50": 100 * 7 / 24, "mMR": 0.0, "Recall": 100.0})
    # CrowdDet's result format: one odgt line per image, xywh boxes, tag 1 (person), image size.
    saved_file = os.path.join(tmp_path, "crowdhuman_detections.odgt")
    with open(saved_file) as f:
        saved = [json.loads(line) for line in f]
    assert [line["ID"] for line in saved] == ["1", "2", "3"]
    assert saved[0] == {"ID": "1", "width": 100, "height": 80, "dtboxes": [
        {"box": [0, 5, 20, 70], "score": pytest.approx(0.9), "tag": 1},
        {"box": [65, 5, 30, 30], "score": pytest.approx(0.95), "tag": 1}]}  # fmt: skip
    assert (saved[2]["width"], saved[2]["height"]) == (50, 50)
    # Round trip: the same ground truth as CrowdHuman's odgt (no sizes, the crowd box as a "mask"
    # region, image 3 absent) and the saved file through the command line give the same numbers.
    gt_lines = [{"ID": "1", "gtboxes": [{"tag": "person", "fbox": [-10, 5, 30, 70]},
                                        {"tag": "mask", "fbox": [60, 0, 40, 40]}]},
                {"ID": "2", "gtboxes": [{"tag": "person", "fbox": [10, 20, 30, 40]}]}]  # fmt: skip
    (tmp_path / "gt.odgt").write_text("".join(json.dumps(line) + "\n" for line in gt_lines))
    assert crowdhuman_cli(["--gt", str(tmp_path / "gt.odgt"), "--dt", saved_file]) == 0
    from_file = json.loads(capsys.readouterr().out)
    printed = {"AP": result["AP50"] / 100, "mMR": result["mMR"] / 100, "Recall": result["Recall"] / 100}
    assert from_file == pytest.approx(printed, abs=1e-6)


def test_only_the_person_class_is_evaluated(dataset):
    # A COCO model evaluated zero-shot: class 0 is "person"; a class-2 box on the person is not.
    evaluator = CrowdHumanEvaluator("crowdhuman_eval_test", distributed=False)
    evaluator.process([{"image_id": 1}, {"image_id": 2}],
                      [_output([[0, 5, 20, 75]], [0.9], [2]), _output([[10, 20, 40, 60]], [0.7], [0])])
    assert evaluator.evaluate()["crowdhuman"]["Recall"] == pytest.approx(50.0)
