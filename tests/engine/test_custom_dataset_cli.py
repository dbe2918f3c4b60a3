"""A user's own COCO json trains and evaluates through tools/train_net.py with no Python written."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from diffusiondet.data.synthetic import generate_synthetic_crowd
from tests.utils import TINY_OPTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_H, TEST_W = 48, 80  # non-square test images: a swapped width/height shows in the boxes
EVAL_BOXES = 30


def _train_net(*args, cwd):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), *map(str, args)]
    # One torch thread: the model is tiny, and a second thread only costs time on a shared CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _copypaste_metrics(log):
    """{metric: value} of the last ``copypaste:`` block of the bbox task in a detectron2 log."""
    lines = [line.split("copypaste: ", 1)[1].strip() for line in log.splitlines() if "copypaste: " in line]
    starts = [i for i, line in enumerate(lines) if line == "Task: bbox"]
    assert starts and len(lines) >= starts[-1] + 3, "no copypaste metrics in the log:\n" + log[-3000:]
    names, values = lines[starts[-1] + 1], lines[starts[-1] + 2]
    return dict(zip(names.split(","), map(float, values.split(","))))


def _coco_metrics(gt_json, detections):
    """AP, AP50, AP75, APs, APm, APl (percent) of ``detections`` recomputed with pycocotools."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    return {n: float(s * 100) if s >= 0 else float("nan") for n, s in zip(names, evaluation.stats)}


def test_train_and_evaluate_own_coco_json(tmp_path):
    train_json = generate_synthetic_crowd(
        str(tmp_path / "data"), split="train", num_images=4, image_size=(64, 64), min_objects=2, max_objects=6, seed=1
    )
    test_json = generate_synthetic_crowd(
        str(tmp_path / "data"), split="val", num_images=3, image_size=(TEST_H, TEST_W), min_objects=2, max_objects=6,
        seed=1,
    )
    custom = [
        "DATASETS.CUSTOM.TRAIN_JSON", train_json,
        "DATASETS.CUSTOM.TRAIN_IMAGES", tmp_path / "data" / "train",
        "DATASETS.CUSTOM.TEST_JSON", test_json,
        "DATASETS.CUSTOM.TEST_IMAGES", tmp_path / "data" / "val",
    ]
    # NUM_CLASSES is deliberately wrong (TINY_OPTS says 3): it must follow the json (5 categories).
    opts = TINY_OPTS + custom + ["SOLVER.MAX_ITER", 2, "OUTPUT_DIR", tmp_path / "out"]
    config = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
    log = _train_net("--config-file", config, *opts, cwd=tmp_path)
    assert "NUM_CLASSES set to 5" in log
    weights = tmp_path / "out" / "model_final.pth"
    assert weights.exists()

    log = _train_net(
        "--config-file", config, "--eval-only", "--steps", 2, "--boxes", EVAL_BOXES,
        *opts, "MODEL.WEIGHTS", weights, cwd=tmp_path,
    )
    assert "Evaluation results for bbox" in log
    with open(tmp_path / "out" / "config.yaml") as f:
        saved = f.read()
    assert "SAMPLE_STEP: 2" in saved and "EVAL_NUM_PROPOSALS: 30" in saved and "NUM_CLASSES: 5" in saved

    with open(tmp_path / "out" / "inference" / "custom_test" / "coco_instances_results.json") as f:
        detections = json.load(f)
    with open(test_json) as f:
        gt = json.load(f)
    # Every evaluation image got detections. No score threshold is applied, so an untrained model
    # still returns up to EVAL_BOXES boxes per image: with SAMPLE_STEP 2 (official ensemble) one
    # model call's top-30 (proposal, class) pairs, minus NMS and boxes empty after clipping.
    per_image = {img["id"]: [d for d in detections if d["image_id"] == img["id"]] for img in gt["images"]}
    assert {d["image_id"] for d in detections} == set(per_image)
    for image_id, dets in per_image.items():
        assert 3 <= len(dets) <= EVAL_BOXES, (image_id, len(dets))
    # Results use the json's category ids (1..5 here, not the model's 0..4) and original-image
    # boxes (abs xywh, inside the 80 x 48 image), with sigmoid scores.
    categories = {c["id"] for c in gt["categories"]}
    assert categories == {1, 2, 3, 4, 5}
    assert {d["category_id"] for d in detections} <= categories
    for d in detections:
        x, y, w, h = d["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0, d
        assert x + w <= TEST_W + 1e-3 and y + h <= TEST_H + 1e-3, d
        assert 0.0 < d["score"] < 1.0
    # The printed metrics are finite (NaN = no detections) and are those of the saved detections.
    printed = _copypaste_metrics(log)
    assert set(printed) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    recomputed = _coco_metrics(test_json, detections)
    for name in ("AP", "AP50", "AP75"):
        assert math.isfinite(printed[name]) and 0.0 <= printed[name] <= 100.0, printed
        assert abs(printed[name] - recomputed[name]) < 1e-3, (name, printed, recomputed)
