"""The DiffusionEngine demo job (`make demo-engine`) in its --quick size, end to end, and its
pure parts: label matching, precision / recall, the results check and the stage store."""
import dataclasses
import json
import math
import os

import cv2
import numpy as np
import pytest

from diffusionengine import job_stages, main_job
from diffusionengine.job_labels import LabelledSample, count_matches, precision_recall
from diffusionengine.job_report import check_results, format_tables

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick job (≈ 30-40 s on one thread) on its own synthetic subset."""
    root = tmp_path_factory.mktemp("engine_job")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root / "datasets"))
        settings = dataclasses.replace(
            main_job.quick_settings(str(root / "out")), num_images=(7, 3),
            res18_config=os.path.join(CONFIGS, "diffdet.synthetic.res18.yaml"),
            adapter_config=os.path.join(CONFIGS, "diffengine.synthetic.tinysd.yaml"))
        results = main_job.run_engine_job(settings, progress=False)
    return settings, results


def test_quick_job_values_in_range_and_files_written(quick_run):
    settings, results = quick_run
    out = settings.out_dir
    with open(os.path.join(out, "engine_results.json")) as f:
        stored = json.load(f)
    assert stored["adapter"] == results["adapter"]
    check_results(stored)
    rows = results["adapter"]["trained_unet"] + results["adapter"]["random_unet"] + results["adapter"]["res18_main_job"]
    assert len(rows) == 3 * len(settings.steps) * len(settings.boxes)
    assert all(0.0 <= r[m] <= 100.0 for r in rows for m in ("AP", "AP50", "AP75"))
    assert results["adapter"]["res18_source"].startswith("trained here")
    for part in ("generated", "real_references"):
        pr = results["labels"][part]
        assert [r["delta"] for r in pr] == list(settings.deltas)
        assert all(0.0 <= r["recall"] <= 1.0 and r["gt_per_image"] > 0 for r in pr)
        # A higher δ keeps a subset of the labels.
        assert all(a["labels_per_image"] >= b["labels_per_image"] for a, b in zip(pr, pr[1:]))
    assert results["generated_set"]["images"] == settings.gen_images
    assert [len(seed_rows) for seed_rows in results["real_vs_generated"]["gen"]] == [len(settings.boxes)] * 2
    assert [r["size"] for r in results["timing"]] == list(settings.timing_sizes)
    assert all(0 < r["cpu_seconds_per_image"] < 60 for r in results["timing"])
    table = open(os.path.join(out, "engine_table.md")).read()
    assert "## 4. Cost of a labelled image" in table and "| real + generated (2 it) | 2 | 20 |" in table
    grid = cv2.imread(os.path.join(out, "generated_labels.png"))
    assert grid.shape[0] > 3 * settings.gen_size and grid.shape[1] >= 4 * settings.gen_size
    assert os.path.isfile(os.path.join(out, "tiny_ldm", "samples.png"))
    stages = sorted(os.listdir(os.path.join(out, "stages")))
    assert stages == sorted(f"{n}.json" for n in main_job.stage_names(settings))


def test_second_run_reuses_every_stage(quick_run, monkeypatch):
    settings, results = quick_run

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for name in ("tiny_ldm", "detector", "main_job", "labels", "generated_set", "timing"):
        monkeypatch.setattr(job_stages, name, must_not_run)
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.join(os.path.dirname(settings.out_dir), "datasets"))
    again = main_job.run_engine_job(settings, progress=False)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


def test_stage_with_other_settings_names_its_file(quick_run, monkeypatch):
    settings, _ = quick_run
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.join(os.path.dirname(settings.out_dir), "datasets"))
    with pytest.raises(ValueError, match=r"stages/labels\.json was computed with other settings"):
        main_job.run_engine_job(dataclasses.replace(settings, label_strength=0.5), progress=False)


def _sample(boxes, classes, scores, gt_boxes, gt_classes):
    return LabelledSample(np.zeros((8, 8, 3), np.uint8), np.array(boxes, np.float32).reshape(-1, 4),
                          np.array(classes), np.array(scores, np.float32),
                          np.array(gt_boxes, np.float32).reshape(-1, 4), np.array(gt_classes))


def test_matching_is_class_aware_greedy_and_one_to_one():
    gt = [[0, 0, 10, 10], [20, 0, 30, 10]]
    # Two predictions on GT 0 (only one may match), one of the wrong class on GT 1.
    assert count_matches(np.array([[0, 0, 10, 10], [1, 0, 10, 10], [20, 0, 30, 10]], np.float32),
                         np.array([0, 0, 0]), np.array(gt, np.float32), np.array([0, 1])) == 1
    # IoU 0.5 exactly (half overlap of equal boxes is 1/3): 0 matches; a shifted box at 0.6: 1.
    assert count_matches(np.array([[5, 0, 15, 10]], np.float32), np.array([0]), np.array(gt[:1], np.float32),
                         np.array([0])) == 0
    assert count_matches(np.array([[0, 0, 10, 12]], np.float32), np.array([0]), np.array(gt[:1], np.float32),
                         np.array([0])) == 1


def test_precision_recall_per_delta():
    samples = [_sample([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [0.9, 0.35],
                       [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1]),
               _sample([], [], [], [[0, 0, 5, 5]], [2])]
    rows = precision_recall(samples, [0.3, 0.5, 0.95])
    assert (rows[0]["precision"], rows[0]["recall"], rows[0]["labels_per_image"]) == (0.5, 1 / 3, 1.0)
    assert (rows[1]["precision"], rows[1]["recall"], rows[1]["labels_per_image"]) == (1.0, 1 / 3, 0.5)
    assert math.isnan(rows[2]["precision"]) and rows[2]["recall"] == 0.0


def test_check_results_names_bad_values_and_table_shows_spread(quick_run):
    _, results = quick_run
    bad = json.loads(json.dumps(results))
    bad["adapter"]["random_unet"][0]["AP"] = float("nan")
    bad["labels"]["generated"][1]["recall"] = 1.5
    with pytest.raises(ValueError, match=r"adapter\.random_unet\.AP = nan.*labels\.generated\.recall@0\.3 = 1\.5"):
        check_results(bad)
    spread = json.loads(json.dumps(results))
    spread["real_vs_generated"]["real"][0][0]["AP"], spread["real_vs_generated"]["real"][1][0]["AP"] = 10.0, 20.0
    assert "| real (2 it) | 2 | 20 | 15.0 ± 7.1 |" in format_tables(spread)


def test_main_job_rows_come_from_make_demo_when_its_table_matches(tmp_path, monkeypatch):
    settings = dataclasses.replace(main_job.EngineJobSettings(out_dir=str(tmp_path / "out")),
                                   main_job_dir=str(tmp_path),
                                   res18_config=os.path.join(CONFIGS, "diffdet.synthetic.res18.yaml"))
    rows = [{"steps": s, "boxes": b, "AP": 30.0 + s, "AP50": 60.0, "AP75": 28.0} for s in (1, 4) for b in (100, 300)]
    os.makedirs(tmp_path / "seed_40244023")
    with open(tmp_path / "seed_40244023" / "ap_table.json", "w") as f:  # `make demo --seeds 40244023 ...`
        json.dump({"seed": 40244023, "rows": rows}, f)
    with open(tmp_path / "ap_table.json", "w") as f:  # a run with another SEED: not this config's
        json.dump({"seed": 7, "rows": rows}, f)
    calls = []
    monkeypatch.setattr(job_stages, "detector", lambda *a: calls.append(a) or {"rows": []})
    reused = job_stages.main_job(settings, [])
    assert reused == {"rows": rows, "source": str(tmp_path / "seed_40244023" / "ap_table.json")} and not calls
    # A table without every (steps, boxes) of the job is not enough: the job trains its own.
    trained = job_stages.main_job(dataclasses.replace(settings, boxes=(100, 500)), [])
    assert trained["source"] == "trained here (600 iterations)" and len(calls) == 1
