"""Smoke runs of the two command-line jobs that the test suite otherwise never starts:
tools/run_main_job.py (`make demo`: data, training, evaluation per (steps, boxes), AP table) and
tools/benchmark.py (fast path against the reference path), each on a tiny model in seconds.

Both run as a user runs them, in a child process, with one torch thread: the models are tiny, and a
second thread only costs time when the CPU is shared (e.g. a parallel test run).
"""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys

import cv2
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from diffusiondet.data.synthetic import generate_synthetic_crowd
from tests.utils import TINY_OPTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
TINY = [*map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5"]  # the synthetic set's classes


def _run(script, *args, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, os.path.join(REPO, "tools", script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _markdown_rows(text, header_start):
    """The body rows ({column: cell text}) of the markdown table whose header line starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def _coco_ap(gt_json, detections):
    """(AP, AP50, AP75) in percent of ``detections`` against ``gt_json``, recomputed here."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        evaluation = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return tuple(float(x) * 100 for x in evaluation.stats[:3])


def test_run_main_job_trains_evaluates_and_writes_the_ap_table(tmp_path):
    steps, boxes, max_iter = (1, 2), (10, 300), 3
    out = tmp_path / "out"
    stdout = _run(
        "run_main_job.py", "--config-file", CONFIG, "--output-dir", out, "--max-iter", max_iter,
        "--num-images", 6, 3, "--steps", *steps, "--boxes", *boxes, "--opts", *TINY,
        "SOLVER.CHECKPOINT_PERIOD", 1,  # periodic files after iterations 0 and 1; 2 is the final
        cwd=tmp_path, env={"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
    )  # fmt: skip
    # The main job's config keeps two checkpoint files: the newest periodic one and the final.
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth", "model_final.pth"]
    # --num-images: the first 6 / 3 images of the synthetic set, generated under the given root.
    data = tmp_path / "datasets" / "synthetic_crowd_6_3" / "synthetic_crowd"
    for split, count in (("train", 6), ("val", 3)):
        with open(data / "annotations" / f"{split}.json") as f:
            assert len(json.load(f)["images"]) == count
    assert "DiffusionDet on synthetic_crowd_val_3" in stdout

    # Really trained: the final checkpoint is that of the last of the 3 iterations, and the
    # iterations logged finite losses.
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == max_iter - 1

    # ap_table.json: one row per (steps, boxes), in order, with finite metrics.
    with open(out / "ap_table.json") as f:
        table = json.load(f)
    assert set(table) == {"seed", "rows", "seconds"} and table["seed"] == 40244023  # the config's
    assert table["seconds"]["data_and_training"] > 0
    assert len(table["seconds"]["evaluation"]) == 4 and min(table["seconds"]["evaluation"]) > 0
    rows = table["rows"]
    assert [(r["steps"], r["boxes"]) for r in rows] == [(s, b) for s in steps for b in boxes]
    for r in rows:
        assert set(r) == {"steps", "boxes", "AP", "AP50", "AP75"}  # no timing: the table is the seed's
        assert all(math.isfinite(r[k]) and 0.0 <= r[k] <= 100.0 for k in ("AP", "AP50", "AP75")), r
    # The last row's evaluation (its detections are saved) found boxes in every val image, and
    # its AP numbers are those of these detections.
    results = out / "inference" / "synthetic_crowd_val_3" / "coco_instances_results.json"
    with open(results) as f:
        detections = json.load(f)
    assert len({d["image_id"] for d in detections}) == 3
    recomputed = _coco_ap(data / "annotations" / "val.json", detections)
    for value, key in zip(recomputed, ("AP", "AP50", "AP75")):
        assert math.isclose(value, rows[-1][key], abs_tol=1e-9), (recomputed, rows[-1])

    # The printed table shows the same rows and numbers.
    printed = _markdown_rows(stdout, "| steps | boxes |")
    assert len(printed) == len(rows)
    for p, r in zip(printed, rows):
        assert (int(p["steps"]), int(p["boxes"])) == (r["steps"], r["boxes"])
        for key in ("AP", "AP50", "AP75"):
            assert math.isfinite(float(p[key])) and p[key] == f"{r[key]:.1f}", (p, r)
    assert "Data + training:" in stdout and "evaluation per row:" in stdout
    # The two pictures beside the table (what they show: tests/test_main_job_figures.py).
    assert table["seconds"]["figures"] > 0
    for name in ("predictions.png", "ap_vs_steps_boxes.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.std() > 10, name


def _main_job(tmp_path, out, *args):
    return _run(
        "run_main_job.py", "--config-file", CONFIG, "--output-dir", out, "--max-iter", 4,
        "--num-images", 6, 3, "--steps", 1, 2, "--boxes", 20, *args,
        "--opts", *TINY, "DATALOADER.NUM_WORKERS", 1, "SOLVER.CHECKPOINT_PERIOD", 2,
        cwd=tmp_path, env={"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
    )  # fmt: skip


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_main_job_twice_gives_the_same_table_and_bit_identical_weights(tmp_path):
    first, second = (_main_job(tmp_path, tmp_path / name) for name in ("a", "b"))
    table = lambda text: _markdown_rows(text, "| steps | boxes |")  # noqa: E731
    assert table(first) == table(second)
    a, b = _weights(tmp_path / "a" / "model_final.pth"), _weights(tmp_path / "b" / "model_final.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Another seed is another run: other initial weights, data order and noise.
    other = _main_job(tmp_path, tmp_path / "c", "--seeds", 3)
    c = _weights(tmp_path / "c" / "seed_3" / "model_final.pth")
    assert not torch.equal(a["head.head_series.0.class_logits.weight"], c["head.head_series.0.class_logits.weight"])
    assert "mean ± std over SEED 3" in other


def test_main_job_over_seeds_prints_mean_and_std_of_the_seed_runs(tmp_path):
    stdout = _main_job(tmp_path, tmp_path / "s", "--seeds", 1, 2)
    per_seed = []
    for seed in (1, 2):
        with open(tmp_path / "s" / f"seed_{seed}" / "ap_table.json") as f:
            table = json.load(f)
        assert table["seed"] == seed
        per_seed.append(table["rows"])
    printed = _markdown_rows(stdout, "| steps | boxes |")
    assert [(p["steps"], p["boxes"]) for p in printed] == [("1", "20"), ("2", "20")]
    for p, one, two in zip(printed, *per_seed):
        for key in ("AP", "AP50", "AP75"):
            mean, std = (one[key] + two[key]) / 2, abs(one[key] - two[key]) / math.sqrt(2)
            assert p[key] == f"{mean:.1f} ± {std:.1f}", (p, one, two)
    # The AP curve with its mean ± std band over the seeds; each seed's detections in its folder.
    for path in ("ap_vs_steps_boxes.png", "seed_1/predictions.png", "seed_2/ap_vs_steps_boxes.png"):
        assert cv2.imread(str(tmp_path / "s" / path)) is not None, path


def check_training_line(stdout):
    """The benchmark's training line: both paths' rates, their ratio, and the first losses of
    the two paths equal (same weights, batch and noise; the paths differ in speed only)."""
    line = next(line for line in stdout.splitlines() if line.startswith("Training ("))
    match = re.search(r"\): ([\d.]+) iterations/s, reference path ([\d.]+), time ratio "
                      r"fast/reference ([\d.]+); first-iteration losses max \|Δ\| (\S+)$", line)
    assert match, line
    fast, ref, ratio, loss_diff = (float(v) for v in match.groups())
    assert fast > 0 and ref > 0 and abs(ratio - ref / fast) <= 0.01 + 0.01 * ratio, line
    assert loss_diff == 0.0, line


def test_benchmark_prints_finite_positive_ratios():
    stdout = _run(
        "benchmark.py", "--quick", "--config-file", CONFIG, "--image-size", 96, "--train-iters", 1,
        "--batches", "1,2", "--amp", "", *TINY, cwd=REPO,
    )  # fmt: skip
    assert "96x96" in stdout  # explicit sizes win over --quick's
    rows = _markdown_rows(stdout, "| mode | steps |")
    # --quick's cases (steps, boxes) = (1, 300), (4, 300), each at batches 1 and 2; no AMP rows.
    assert [(r["mode"], r["steps"], r["boxes"], r["batch"]) for r in rows] == [
        ("fast", s, "300", b) for s in ("1", "4") for b in ("1", "2")
    ]
    for r in rows:
        fast, ref = float(r["img/s fast"]), float(r["img/s ref"])
        ratio, head_ratio = float(r["ratio"]), float(r["head ratio"])
        for value in (fast, ref, ratio, float(r["head img/s fast"]), float(r["head img/s ref"]), head_ratio):
            assert math.isfinite(value) and value > 0, r
        # The ratio is fast / reference (printed values are rounded to 3 and 2 decimals).
        assert abs(ratio - fast / ref) <= 0.006 + 0.0005 * (1 / ref + fast / ref**2), r
        # Same per-image noise on both paths: the reference's detections are found again.
        assert int(r["same top-100"].rstrip("%")) >= 50, r
    check_training_line(stdout)


def test_benchmark_graph_and_tf32_rows():
    # --graph: the graph sampling mode eager and compiled (aot_eager here: inductor's C++ build
    # takes minutes on CPU); --tf32 is a no-op on CPU but must still produce its rows.
    stdout = _run(
        "benchmark.py", "--quick", "--config-file", CONFIG, "--image-size", 96, "--train-iters", 0,
        "--batches", "1,2", "--amp", "", "--cases", "4@300", "--graph", "--graph-backend",
        "aot_eager", "--tf32", *TINY, cwd=REPO,
    )  # fmt: skip
    rows = _markdown_rows(stdout, "| mode | steps |")
    assert [(r["mode"], r["batch"]) for r in rows] == [
        (mode, b) for mode in ("fast", "fast+tf32", "graph", "graph+compile") for b in ("1", "2")
    ]
    for r in rows:
        assert math.isfinite(float(r["img/s fast"])) and float(r["img/s fast"]) > 0, r
        # Graph mode renews by masking (other draws than the reference): the detections differ,
        # but most of the reference's best ones are found again.
        assert int(r["same top-100"].rstrip("%")) >= (50 if r["mode"].startswith("fast") else 20), r
    assert math.isnan(float(next(r for r in rows if r["mode"] == "graph+compile")["head img/s fast"]))


def test_diffusioninst_main_job_on_coco_json_prints_mask_ap(tmp_path):
    # The DiffusionInst main job on an own COCO json with polygon masks (--coco-json: the same
    # images for training and evaluation, no synthetic set generated): box and mask AP rows.
    json_path = generate_synthetic_crowd(str(tmp_path / "coco"), split="train", num_images=3, seed=1,
                                         image_size=(64, 96), min_objects=2, max_objects=6)  # fmt: skip
    out = tmp_path / "out"
    inst = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
            "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip
    stdout = _run(
        "run_main_job.py", "--config-file", os.path.join(REPO, "configs", "diffinst.synthetic.res18.yaml"),
        "--output-dir", out, "--max-iter", 2, "--steps", 1, 4, "--boxes", 10,
        "--coco-json", json_path, "--coco-images", tmp_path / "coco" / "train", "--opts", *TINY, *inst,
        cwd=tmp_path, env={"DETECTRON2_DATASETS": str(tmp_path / "datasets")},
    )  # fmt: skip
    assert "DiffusionInst on custom_test" in stdout
    assert not (tmp_path / "datasets").exists()  # the synthetic set was not generated
    with open(out / "ap_table.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["steps"], r["boxes"]) for r in rows] == [(1, 10), (4, 10)]
    for r in rows:
        assert {"mask AP", "mask AP50"} <= set(r)
        assert all(math.isfinite(r[k]) and 0.0 <= r[k] <= 100.0 for k in ("AP", "mask AP", "mask AP50"))
    printed = _markdown_rows(stdout, "| steps | boxes |")
    assert [p["mask AP"] for p in printed] == [f"{r['mask AP']:.1f}" for r in rows]
    results = out / "inference" / "custom_test" / "coco_instances_results.json"
    with open(results) as f:
        detections = json.load(f)
    assert detections and all("segmentation" in d for d in detections)  # RLE masks evaluated


def test_benchmark_runs_on_a_diffusioninst_config():
    inst = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", "16", "MODEL.DiffusionInst.MASK_NUM_CONVS", "1",
            "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip
    stdout = _run(
        "benchmark.py", "--quick", "--config-file", os.path.join(REPO, "configs", "diffinst.synthetic.res18.yaml"),
        "--image-size", 96, "--train-iters", 1, "--batches", "1", "--amp", "", *TINY, *inst, cwd=REPO,
    )  # fmt: skip
    assert "## DiffusionInst benchmark" in stdout
    rows = _markdown_rows(stdout, "| mode | steps |")
    assert rows and all(float(r["ratio"]) > 0 and int(r["same top-100"].rstrip("%")) >= 50 for r in rows)
    check_training_line(stdout)


def test_count_host_syncs_prints_both_modes():
    # The graph mode's loop has no host sync and its total does not grow with the steps; the
    # parity mode's does.
    totals = {}
    for steps in (2, 4):
        stdout = _run("dev/count_host_syncs.py", "--config-file", CONFIG, "--steps", steps, "--boxes", 20,
                      "--batch", 2, *TINY, cwd=REPO)  # fmt: skip
        rows = _markdown_rows(stdout, "| mode |")
        assert [r["mode"] for r in rows] == ["parity", "graph"]
        totals[steps] = {r["mode"]: (int(r["in the sampling loop"]), int(r["sampling + post-processing"])) for r in rows}
    assert totals[2]["graph"][0] == totals[4]["graph"][0] == 0
    assert totals[2]["graph"] == totals[4]["graph"] and "torchvision::nms 1" in rows[1]["by op (whole)"]
    assert 0 < totals[2]["parity"][0] < totals[4]["parity"][0]


@pytest.mark.parametrize("part", ["head", "backbone"])
def test_profile_speed_runs_each_part(part):
    stdout = _run("dev/profile_speed.py", part, "--config-file", CONFIG, "--height", 64, "--width", 96,
                  "--boxes", 20, "--rows", 3, *TINY, cwd=REPO)  # fmt: skip
    if part == "head":  # both poolers, each with its time and profile table
        timed = re.findall(r"fixed-shape pooling (False|True): best of 3 ([\d.]+) s", stdout)
        assert [m[0] for m in timed] == ["False", "True"] and all(float(m[1]) > 0 for m in timed)
        assert stdout.count("Self CPU time total") == 2
    else:  # the synthetic config's GroupNorm ResNet-18 has nothing to fold
        assert "FOLD_FROZEN_BN False" in stdout and "(0 folding convolutions)" in stdout
