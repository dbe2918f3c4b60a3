#!/usr/bin/env python
"""Evaluate one model without test-time augmentation and with it under each merge (docs/tta.md).

    python tools/compare_tta.py --config-file configs/diffdet.synthetic.res18.yaml --steps 4 --boxes 300 \
        --output-dir output/compare_tta MODEL.WEIGHTS output/synthetic_res18/model_final.pth \
        TEST.AUG.MIN_SIZES "(128, 160, 192, 224)" TEST.AUG.MAX_SIZE 448 TEST.AUG.SCALE_FILTER False

One row per run: no TTA (the plain evaluation), then TEST.AUG with each ``--merges`` entry
(CVPODS_TTA on; "nms" is also what CVPODS_TTA False gives). Columns: each task's AP and AP50
(every metric for evaluators without them), and wall seconds per image of the whole evaluation
(data loading included), after one untimed plain evaluation that pays the process's warm-up.
Prints a Markdown table and writes it to <output-dir>/tta_comparison.md, the metrics to
tta_comparison.json and each run's evaluator files to <output-dir>/<run>/.
"""
import argparse
import json
import os
import sys
import time

from detectron2.data import DatasetCatalog
from detectron2.utils.logger import setup_logger

from diffusiondet.engine import Trainer, load_model_weights
from diffusiondet.modeling.tta_merge import MERGES
from diffusiondet.test_time_augmentation import evaluate_with_tta
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs

# Metrics tabulated for each task (bbox, segm) when the evaluator reports them.
MAIN_METRICS = ("AP", "AP50")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--merges", nargs="+", default=["nms", "soft_vote", "wbf"], choices=MERGES)
    parser.add_argument("--steps", type=int, default=None, help="MODEL.DiffusionDet.SAMPLE_STEP")
    parser.add_argument("--boxes", type=int, default=None, help="MODEL.DiffusionDet.EVAL_NUM_PROPOSALS")
    parser.add_argument("--dataset", default="", help="default: the first of DATASETS.TEST")
    parser.add_argument("--output-dir", default="output/compare_tta")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (MODEL.WEIGHTS)")
    return parser.parse_args(argv)


def run_config(cfg, dataset: str, output_dir: str, merge: str = ""):
    """A copy of ``cfg`` evaluating ``dataset`` into ``output_dir``; TEST.AUG.MERGE ``merge``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset,)
    cfg.OUTPUT_DIR = output_dir
    if merge:
        cfg.TEST.AUG.CVPODS_TTA = True
        cfg.TEST.AUG.MERGE = merge
    cfg.freeze()
    return cfg


def table_columns(results: dict) -> list:
    """(task, metric) pairs to tabulate from one run's {task: {metric: value}}."""
    columns = []
    for task, metrics in results.items():
        main = [m for m in MAIN_METRICS if m in metrics]
        columns += [(task, m) for m in (main or list(metrics))]
    return columns


def markdown_table(rows: list) -> str:
    """rows: dicts with run, views, results {task: {metric: value}}, seconds_per_image."""
    columns = table_columns(rows[0]["results"])
    header = ["run", "views"] + [f"{task} {metric}" for task, metric in columns] + ["s / image"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [f"{row['results'].get(task, {}).get(metric, float('nan')):.1f}" for task, metric in columns]
        cells = [row["run"], str(row["views"])] + values + [f"{row['seconds_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="diffusiondet")
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    model = Trainer.build_model(cfg).eval()
    load_model_weights(model, cfg)  # an error without weights, or with weights that do not fit
    num_images = len(DatasetCatalog.get(dataset))
    tta_views = len(cfg.TEST.AUG.MIN_SIZES) * (2 if cfg.TEST.AUG.FLIP else 1)
    # One untimed plain evaluation first: the one-time costs (allocator, kernels' first calls, the
    # dataset's first load) would otherwise all land on the first timed row.
    Trainer.test(run_config(cfg, dataset, os.path.join(args.output_dir, "warm_up")), model)
    rows = []
    for merge in [""] + args.merges:
        name = f"tta_{merge}" if merge else "no_tta"
        run_cfg = run_config(cfg, dataset, os.path.join(args.output_dir, name), merge)
        start = time.perf_counter()
        results = evaluate_with_tta(run_cfg, model) if merge else Trainer.test(run_cfg, model)
        seconds = time.perf_counter() - start
        rows.append({
            "run": f"TTA {merge}" if merge else "no TTA",
            "views": tta_views if merge else 1,
            "results": {task.replace("_TTA", ""): dict(metrics) for task, metrics in results.items()},
            "seconds_per_image": seconds / max(num_images, 1),
        })  # fmt: skip
    table = markdown_table(rows)
    print(table)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "tta_comparison.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output_dir, "tta_comparison.json"), "w") as f:
        json.dump({"dataset": dataset, "num_images": num_images, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
