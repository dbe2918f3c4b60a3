"""A user's own COCO json trains and evaluates through tools/train_net.py with no Python written."""
import json
import os
import subprocess
import sys

from diffusiondet.data.synthetic import generate_synthetic_crowd
from tests.utils import TINY_OPTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_net(*args, cwd):
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_and_evaluate_own_coco_json(tmp_path):
    train_json = generate_synthetic_crowd(
        str(tmp_path / "data"), split="train", num_images=4, image_size=(64, 64), min_objects=2, max_objects=6, seed=1
    )
    test_json = generate_synthetic_crowd(
        str(tmp_path / "data"), split="val", num_images=2, image_size=(64, 64), min_objects=2, max_objects=6, seed=1
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
        "--config-file", config, "--eval-only", "--steps", 2, "--boxes", 30,
        *opts, "MODEL.WEIGHTS", weights, cwd=tmp_path,
    )
    assert "Evaluation results for bbox" in log
    with open(tmp_path / "out" / "config.yaml") as f:
        saved = f.read()
    assert "SAMPLE_STEP: 2" in saved and "EVAL_NUM_PROPOSALS: 30" in saved
    with open(tmp_path / "out" / "inference" / "custom_test" / "coco_instances_results.json") as f:
        detections = json.load(f)
    assert {d["image_id"] for d in detections} <= {img["id"] for img in json.load(open(test_json))["images"]}
