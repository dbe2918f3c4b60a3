"""Test-time augmentation end to end (docs/tta.md): ``evaluate_with_tta`` on a tiny non-square
synthetic set, ``tools/train_net.py`` with TEST.AUG.ENABLED (evaluation only and after training),
and ``tools/compare_tta.py``."""
import importlib.util
import json
import os

import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.engine import Trainer, argument_parser
from diffusiondet.test_time_augmentation import DiffusionDetWithTTA, evaluate_with_tta
from tests.utils import TINY_OPTS, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
DATASET = "tta_eval_val"
H, W = 48, 80  # non-square
# Two sizes around MIN_SIZE_TEST 64 with their flips: 4 views; the official ranges are for COCO.
AUG = ["TEST.AUG.MIN_SIZES", (48, 64), "TEST.AUG.MAX_SIZE", 160, "TEST.AUG.SCALE_FILTER", False]
COMMON = ["DATASETS.TRAIN", (DATASET,), "DATASETS.TEST", (DATASET,), "MODEL.DiffusionDet.NUM_CLASSES", 5]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tta_eval"))
    json_file = generate_synthetic_crowd(
        root, split="val", num_images=3, image_size=(H, W), min_objects=2, max_objects=5, seed=4
    )
    register_coco_json(DATASET, json_file, os.path.join(root, "val"))
    return DATASET


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg(*COMMON)).eval()


def detections(output_dir, folder):
    with open(os.path.join(output_dir, folder, DATASET, "coco_instances_results.json")) as f:
        return json.load(f)


def test_tta_evaluation_is_reproducible_and_differs_from_one_view(dataset, model, tmp_path, monkeypatch):
    seen_sizes = []  # the images the TTA gets: the originals, not resized to MIN_SIZE_TEST 64
    one_image = DiffusionDetWithTTA.inference_one_image
    monkeypatch.setattr(DiffusionDetWithTTA, "inference_one_image",
                        lambda self, x: seen_sizes.append(tuple(x["image"].shape[1:])) or one_image(self, x))
    runs = []
    for run in ("a", "b"):
        cfg = tiny_cfg(*COMMON, *AUG, "OUTPUT_DIR", str(tmp_path / run))
        torch.manual_seed(0 if run == "a" else 1)  # the global generator plays no part
        results = evaluate_with_tta(cfg, model)
        assert list(results) == ["bbox_TTA"] and "AP" in results["bbox_TTA"]
        runs.append(detections(tmp_path / run, "inference_TTA"))
    assert seen_sizes == [(H, W)] * 6
    assert runs[0] == runs[1] and len(runs[0]) > 0
    assert {d["image_id"] for d in runs[0]} == {1, 2, 3}
    for det in runs[0]:  # COCO xywh inside the original W x H image
        x, y, w, h = det["bbox"]
        assert 0 <= x and x + w <= W + 1e-3 and 0 <= y and y + h <= H + 1e-3
    cfg = tiny_cfg(*COMMON, "OUTPUT_DIR", str(tmp_path / "plain"))
    Trainer.test(cfg, model)
    plain = detections(tmp_path / "plain", "inference")
    assert sorted(map(json.dumps, plain)) != sorted(map(json.dumps, runs[0]))


def test_diffusioninst_tta_evaluation_scores_boxes_and_masks(dataset, tmp_path):
    inst = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
            "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip
    config = os.path.join(REPO, "configs", "diffinst.synthetic.res18.yaml")
    cfg = tiny_cfg(*COMMON, *inst, *AUG, "OUTPUT_DIR", str(tmp_path), config_file=config)
    torch.manual_seed(0)
    results = evaluate_with_tta(cfg, build_model(cfg).eval())
    assert set(results) == {"bbox_TTA", "segm_TTA"}
    found = detections(tmp_path, "inference_TTA")
    assert found and all(det["segmentation"]["size"] == [H, W] for det in found)  # RLE at H x W


def _train_net():
    spec = importlib.util.spec_from_file_location("train_net_for_tta", os.path.join(REPO, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(*opts):
    opts = TINY_OPTS + COMMON + AUG + list(opts)
    return argument_parser().parse_args(["--config-file", CONFIG, *map(str, opts)])


def test_train_net_evaluation_adds_tta_results_when_enabled(dataset, model, tmp_path):
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    main = _train_net().main
    for enabled, keys in ((True, {"bbox", "bbox_TTA"}), (False, {"bbox"})):
        out = tmp_path / str(enabled)
        args = _args("MODEL.WEIGHTS", weights, "OUTPUT_DIR", out, "TEST.AUG.ENABLED", enabled)
        args.eval_only = True
        assert set(main(args)) == keys
        assert os.path.isdir(out / "inference_TTA") == enabled


def test_training_ends_with_a_tta_evaluation(dataset, tmp_path):
    main = _train_net().main
    args = _args("OUTPUT_DIR", tmp_path, "TEST.AUG.ENABLED", True, "SOLVER.MAX_ITER", 1,
                 "SOLVER.CHECKPOINT_PERIOD", 100)  # fmt: skip
    main(args)
    assert len(detections(tmp_path, "inference_TTA")) > 0


def test_compare_tta_prints_one_row_per_run(dataset, model, tmp_path, capsys):
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)
    spec = importlib.util.spec_from_file_location("compare_tta", os.path.join(REPO, "tools", "compare_tta.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    opts = [*TINY_OPTS, *COMMON, *AUG, "MODEL.WEIGHTS", weights]
    # --boxes 7: every run samples 7 boxes per view, so no image has more than 7 detections.
    argv = ["--config-file", CONFIG, "--boxes", "7", "--output-dir", str(tmp_path), *map(str, opts)]
    assert tool.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()[-6:]
    assert lines[0] == "| run | views | bbox AP | bbox AP50 | s / image |"
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        ["| no TTA", "1"], ["| TTA nms", "4"], ["| TTA soft_vote", "4"], ["| TTA wbf", "4"]
    ]
    saved = json.load(open(tmp_path / "tta_comparison.json"))
    assert saved["num_images"] == 3 and all(row["seconds_per_image"] > 0 for row in saved["rows"])
    runs = {}
    for name in ["no_tta/inference"] + [f"tta_{m}/inference_TTA" for m in ("nms", "soft_vote", "wbf")]:
        runs[name] = json.load(open(tmp_path / name / DATASET / "coco_instances_results.json"))
        per_image = [sum(d["image_id"] == i for d in runs[name]) for i in (1, 2, 3)]
        assert 0 < max(per_image) <= 7, (name, per_image)
    # Each run merged its own way: four different sets of detections.
    assert len({json.dumps(found, sort_keys=True) for found in runs.values()}) == 4
