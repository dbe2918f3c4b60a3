"""faster-coco-eval computes the same COCO / LVIS numbers as pycocotools / the lvis API (every
summary stat to 1e-4, on made-up cases with crowd regions, masks, non-square images, several
classes, tied scores and a binding per-image cap), the trainer uses it by default and pycocotools
when forced, and the fallback without the package is logged once. LVIS through the trainer, on
the tiny federated json: tests/evaluation/test_lvis_evaluation.py."""
import json
import logging
import math
import os
import runpy
import sys
from collections import defaultdict

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco
from detectron2.structures import Boxes, Instances

from diffusiondet.engine import Trainer
from diffusiondet.evaluation import coco_backend
from diffusiondet.evaluation.backend_benchmark import benchmark_backends, markdown_table, write_synthetic_case
from diffusiondet.evaluation.coco_backend import FasterCOCOEvaluator, build_coco_evaluator
from diffusiondet.evaluation.synthetic_coco import synthetic_case
from tests.utils import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASE = dict(num_images=10, dets_per_image=30, num_categories=4, seed=3)


def test_the_synthetic_case_has_what_the_evaluators_treat_specially():
    gt, results = synthetic_case(**CASE)
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 2
    assert isinstance(next(a for a in gt["annotations"] if a["iscrowd"])["segmentation"]["counts"], list)
    assert len({(im["width"], im["height"]) for im in gt["images"]}) >= 3
    assert all(im["width"] != im["height"] for im in gt["images"])
    assert len({a["category_id"] for a in gt["annotations"]}) == 4
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    assert len(results) == 10 * 30 and all("counts" in r["segmentation"] for r in results)
    assert len({r["score"] for r in results}) < len(results)  # tied scores


@pytest.mark.parametrize("lvis", [False, True], ids=["coco", "lvis"])
@pytest.mark.parametrize("max_dets", [None, 3], ids=["default_cap", "cap3"])
def test_every_stat_equals_the_reference(tmp_path, lvis, max_dets, evaluations_run):
    # detectron2's own evaluation calls with each backend's classes (what the evaluators run).
    # A cap of 3 binds: up to 30 detections per image over 4 classes (LVIS caps per image, COCO
    # per image and class).
    gt_path, dt_path = write_synthetic_case(str(tmp_path), **CASE, lvis=lvis)
    rows = benchmark_backends(gt_path, dt_path, max_dets=max_dets)
    assert [row["task"] for row in rows] == ["load annotations", "bbox", "segm"]
    reference = "lvis" if lvis else "pycocotools"
    assert evaluations_run == [reference, "faster"] * 2
    for row in rows[1:]:
        expected, got = row["stats"][reference], row["stats"]["faster-coco-eval"]
        assert len(expected) == (9 if lvis else 12)
        assert 0.05 < expected[0] < 0.95  # a case where AP can be wrong
        assert got == pytest.approx(expected, abs=1e-4)
        assert row["max_abs_diff"] <= 1e-4
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith(f"| task | {reference} (s) | faster-coco-eval (s) | speed-up |")
    assert len(table.splitlines()) == 5


def _register(name, gt_path, num_categories):
    if name in DatasetCatalog.list():
        return name
    DatasetCatalog.register(name, lambda: [])
    ids = range(1, num_categories + 1)
    MetadataCatalog.get(name).set(json_file=gt_path, evaluator_type="coco", thing_classes=[f"class_{i}" for i in ids],
                                  thing_dataset_id_to_contiguous_id={i: i - 1 for i in ids})  # fmt: skip
    return name


def _model_outputs(gt, results, masks):
    """The synthetic detections as detectron2 model outputs (XYXY boxes, 0-based classes)."""
    per_image = defaultdict(list)
    for result in results:
        per_image[result["image_id"]].append(result)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    inputs, outputs = [], []
    for image_id, dets in per_image.items():
        inst = Instances(sizes[image_id])
        xywh = torch.tensor([d["bbox"] for d in dets])
        inst.pred_boxes = Boxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        inst.scores = torch.tensor([d["score"] for d in dets])
        inst.pred_classes = torch.tensor([d["category_id"] - 1 for d in dets])
        if masks:
            decoded = mask_util.decode([d["segmentation"] for d in dets])
            inst.pred_masks = torch.from_numpy(decoded).permute(2, 0, 1).bool()
        inputs.append({"image_id": image_id})
        outputs.append({"instances": inst})
    return inputs, outputs


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_coco")
    gt_path, dt_path = write_synthetic_case(str(root), **CASE)
    with open(gt_path) as f, open(dt_path) as g:
        gt, results = json.load(f), json.load(g)
    return _register("synthetic_coco_backend_test", gt_path, CASE["num_categories"]), gt, results


def _evaluate(evaluator, gt, results, masks):
    evaluator.reset()
    evaluator.process(*_model_outputs(gt, results, masks))
    return evaluator.evaluate()


def _assert_same_metrics(got, expected):
    assert got.keys() == expected.keys()
    for task in expected:
        assert got[task].keys() == expected[task].keys()
        for key, value in expected[task].items():
            assert math.isnan(value) == math.isnan(got[task][key]), key
            if not math.isnan(value):
                assert got[task][key] == pytest.approx(value, abs=1e-2), key  # percent: 1e-4 of AP


def test_trainer_builds_faster_by_default_and_pycocotools_when_forced(coco_dataset, tmp_path, evaluations_run):
    name, gt, results = coco_dataset
    default = Trainer.build_evaluator(tiny_cfg(), name, str(tmp_path / "a"))
    forced = Trainer.build_evaluator(tiny_cfg("TEST.COCO_EVAL_BACKEND", "pycocotools"), name, str(tmp_path / "b"))
    assert type(default) is FasterCOCOEvaluator and type(forced) is COCOEvaluator
    fast, reference = _evaluate(default, gt, results, False), _evaluate(forced, gt, results, False)
    assert evaluations_run == ["faster", "pycocotools"]
    assert set(fast) == {"bbox"} and 5 < reference["bbox"]["AP"] < 95 and "AP-class_4" in reference["bbox"]
    _assert_same_metrics(fast, reference)


@pytest.mark.parametrize("max_dets", [100, 2])  # 2: detectron2's COCOevalMaxDets path
def test_mask_and_box_metrics_of_the_evaluators_agree(coco_dataset, tmp_path, max_dets, evaluations_run):
    name, gt, results = coco_dataset
    kwargs = dict(tasks=("bbox", "segm"), output_dir=str(tmp_path), max_dets_per_image=max_dets)
    fast = _evaluate(build_coco_evaluator(name, "faster", **kwargs), gt, results, True)
    reference = _evaluate(build_coco_evaluator(name, "pycocotools", **kwargs), gt, results, True)
    assert evaluations_run == ["faster"] * 2 + ["pycocotools"] * 2
    assert reference["segm"]["AP"] != reference["bbox"]["AP"]  # masks are evaluated as masks
    _assert_same_metrics(fast, reference)


def test_detectron2_names_are_restored_after_a_failed_evaluation():
    before = (d2_coco.COCOeval_opt, d2_coco.COCOevalMaxDets)
    with pytest.raises(RuntimeError, match="inside"):
        with coco_backend.faster_classes_in_detectron2():
            from faster_coco_eval import cocoeval

            assert d2_coco.COCOeval_opt is cocoeval.COCOeval and d2_coco.COCOevalMaxDets is cocoeval.COCOeval
            raise RuntimeError("inside")
    assert (d2_coco.COCOeval_opt, d2_coco.COCOevalMaxDets) == before


def test_a_renamed_detectron2_internal_fails_loudly(monkeypatch):
    # Silently keeping pycocotools after a detectron2 upgrade would go unnoticed: it must raise.
    monkeypatch.delattr(d2_coco, "COCOevalMaxDets")
    with pytest.raises(AttributeError, match="COCOevalMaxDets"):
        with coco_backend.faster_classes_in_detectron2():
            pass
    assert not hasattr(d2_coco, "COCOevalMaxDets")  # nothing half-bound left behind


def test_auto_falls_back_to_pycocotools_once_without_faster_coco_eval(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import raises ImportError
    monkeypatch.setattr(coco_backend, "_fallback_logged", False)
    with caplog.at_level(logging.WARNING, logger=coco_backend.__name__):
        assert [coco_backend.resolve_coco_eval_backend("auto") for _ in range(3)] == ["pycocotools"] * 3
    assert [r.getMessage() for r in caplog.records if "faster_coco_eval" in r.getMessage()] == [
        "faster_coco_eval does not import (import of faster_coco_eval halted; None in sys.modules): "
        "COCO / LVIS evaluation uses pycocotools / lvis"
    ]
    with pytest.raises(ImportError, match="TEST.COCO_EVAL_BACKEND is 'faster'"):
        coco_backend.resolve_coco_eval_backend("faster")
    assert coco_backend.resolve_coco_eval_backend("pycocotools") == "pycocotools"


def test_backend_values_are_validated():
    assert coco_backend.resolve_coco_eval_backend("auto") == "faster"  # installed here (pinned)
    message = r"TEST.COCO_EVAL_BACKEND must be one of \('auto', 'faster', 'pycocotools'\), got 'fast'"
    with pytest.raises(ValueError, match=message):
        tiny_cfg("TEST.COCO_EVAL_BACKEND", "fast")
    with pytest.raises(ValueError, match="got 'fast'"):
        coco_backend.resolve_coco_eval_backend("fast")


def test_the_benchmark_tool_writes_a_synthetic_case_and_prints_the_table(tmp_path, capsys):
    tool = runpy.run_path(os.path.join(ROOT, "tools", "bench_coco_eval.py"), run_name="bench_coco_eval")
    tool["main"](["--synthetic-images", "4", "--categories", "3", "--no-masks", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    with open(tmp_path / "detections.json") as f:
        assert len(json.load(f)) == 4 * 100 and sorted(os.listdir(tmp_path)) == ["annotations.json", "detections.json"]
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows == ["task", "load annotations", "bbox"]  # no masks: no segm row
    bbox = next(line for line in out.splitlines() if line.startswith("| bbox |"))
    assert float(bbox.split("|")[-2]) <= 1e-4  # max abs diff column
    with pytest.raises(SystemExit):
        tool["parse_args"](["--synthetic-images", "4", "--gt", "a.json"])  # a case, or files: not both
