"""Time COCO / LVIS evaluation with pycocotools (or the ``lvis`` API) and with faster-coco-eval on
one annotation json and one detection json, through the code the evaluators run, and compare the
numbers (``tools/bench_coco_eval.py`` is the command line, docs/evaluation.md the results).

Per task: results loading, evaluate, accumulate and summarize (detectron2's
``_evaluate_predictions_on_coco`` with each backend's classes, or its
``_evaluate_predictions_on_lvis`` against :func:`evaluate_lvis_faster`); the annotation json is
read and indexed once per backend, timed on its own row. Wall-clock seconds, one run each.
"""
import contextlib
import io
import json
import logging
import os
import time

import numpy as np
from detectron2.evaluation import coco_evaluation as d2_coco
from detectron2.evaluation import lvis_evaluation as d2_lvis

from .coco_backend import LVIS_METRICS, evaluate_lvis_faster, faster_classes_in_detectron2, faster_coco
from .synthetic_coco import synthetic_case

__all__ = ["benchmark_backends", "markdown_table", "write_synthetic_case"]


def write_synthetic_case(out_dir, **kwargs):
    """Write ``synthetic_case(**kwargs)`` as ``<out_dir>/{annotations, detections}.json``."""
    os.makedirs(out_dir, exist_ok=True)
    gt, results = synthetic_case(**kwargs)
    paths = os.path.join(out_dir, "annotations.json"), os.path.join(out_dir, "detections.json")
    for path, data in zip(paths, (gt, results)):
        with open(path, "w") as f:
            json.dump(data, f)
    return paths


def _timed(fn):
    """``(seconds, fn())`` with the libraries' printing and INFO logging silenced (not timed)."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            value = fn()
            return time.perf_counter() - start, value
    finally:
        logging.disable(previous)


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _coco_backends(gt_path, max_dets):
    """name -> (load annotations, evaluate(results, task) -> the 12 COCOeval stats)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    caps = [1, 10, max_dets or 100]

    def reference(gt, results, task):
        return list(d2_coco._evaluate_predictions_on_coco(gt, results, task, cocoeval_fn=COCOeval,
                                                          max_dets_per_image=caps).stats)  # fmt: skip

    def faster(gt, results, task):
        with faster_classes_in_detectron2():  # the classes FasterCOCOEvaluator runs
            return list(d2_coco._evaluate_predictions_on_coco(gt, results, task, cocoeval_fn=d2_coco.COCOeval_opt,
                                                              max_dets_per_image=caps).stats)  # fmt: skip

    return {"pycocotools": (lambda: COCO(gt_path), reference),
            "faster-coco-eval": (lambda: faster_coco(gt_path), faster)}  # fmt: skip


def _lvis_backends(gt_path, max_dets):
    """name -> (load annotations, evaluate(results, task) -> the 9 LVIS APs as fractions)."""
    from lvis import LVIS

    from .lvis_compat import ensure_lvis_numpy_compat

    ensure_lvis_numpy_compat()

    def reference(gt, results, task):
        stats = d2_lvis._evaluate_predictions_on_lvis(gt, results, task, max_dets_per_image=max_dets)
        return [stats[m] / 100 for m in LVIS_METRICS]

    def faster(gt, results, task):
        stats = evaluate_lvis_faster(gt, results, task, max_dets_per_image=max_dets)
        return [stats[m] / 100 for m in LVIS_METRICS]

    return {"lvis": (lambda: LVIS(gt_path), reference),
            "faster-coco-eval": (lambda: faster_coco(gt_path), faster)}  # fmt: skip


def benchmark_backends(gt_path, results_path, tasks=None, max_dets=None):
    """Rows ``{"task", "<reference>", "faster-coco-eval", "max_abs_diff"}`` (seconds; the
    difference over the task's summary stats, as fractions). LVIS when the categories carry a
    ``frequency`` (reference: the ``lvis`` API), else COCO (reference: pycocotools). ``tasks``
    default: bbox, and segm when the detections have masks. ``max_dets``: per-image cap
    (default 100 COCO, 300 LVIS)."""
    with open(gt_path) as f:
        lvis = "frequency" in (json.load(f)["categories"] or [{}])[0]
    backends = (_lvis_backends if lvis else _coco_backends)(gt_path, max_dets)
    first = _load_json(results_path)
    tasks = tasks or (["bbox", "segm"] if first and "segmentation" in first[0] else ["bbox"])
    del first
    rows = [{"task": "load annotations"}]
    apis = {}
    for name, (load, _) in backends.items():
        rows[0][name], apis[name] = _timed(load)
    for task in tasks:
        row, stats = {"task": task}, {}
        for name, (_, evaluate) in backends.items():
            results = _load_json(results_path)  # fresh: loadRes writes into the dicts
            row[name], stats[name] = _timed(lambda: evaluate(apis[name], results, task))
        reference, faster = (np.asarray(s, dtype=float) for s in stats.values())
        row["max_abs_diff"] = float(np.max(np.abs(reference - faster)))
        row["stats"] = stats
        rows.append(row)
    return rows


def markdown_table(rows):
    """The rows as a Markdown table: seconds per backend, speed-up, max |difference| of the stats."""
    reference, faster = [k for k in rows[0] if k != "task"]
    lines = [f"| task | {reference} (s) | {faster} (s) | speed-up | max abs diff of the stats |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
        speed_up = row[reference] / row[faster] if row[faster] > 0 else float("inf")
        lines.append(f"| {row['task']} | {row[reference]:.2f} | {row[faster]:.2f} | {speed_up:.1f}x | {diff} |")
    return "\n".join(lines)
