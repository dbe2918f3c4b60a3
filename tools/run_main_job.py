#!/usr/bin/env python
"""The main job on the embedded default: generate the synthetic crowded dataset, train a small
DiffusionDet on CPU, then evaluate it for every (steps, boxes) pair and print a box-AP table.
With a DiffusionInst config (configs/diffinst.synthetic.res18.yaml, `make demo-inst`) the
table also has mask AP.

    python tools/run_main_job.py [--config-file configs/diffdet.synthetic.res18.yaml]
        [--steps 1 4] [--boxes 100 300] [--retrain] [--output-dir DIR] [--max-iter N]
        [--num-images TRAIN VAL] [--coco-json JSON --coco-images DIR] [--seeds S ...]
        [--opts KEY VALUE ...]

The run is a function of the config's SEED (training, data order, augmentation and sampling
noise): the same command on the same machine prints the same table and writes bit-identical
weights. --seeds S1 S2 ... trains once per seed (OUTPUT_DIR/seed_S) and prints the table as
mean ± std over the seeds.

Training resumes from the last checkpoint in OUTPUT_DIR, so a second run only re-evaluates
(pass --retrain to start over). --output-dir and --max-iter set OUTPUT_DIR and SOLVER.MAX_ITER;
--num-images uses the first TRAIN / VAL images of the synthetic set instead of all 600 / 100
(generated under $DETECTRON2_DATASETS/synthetic_crowd_TRAIN_VAL, registered as
synthetic_crowd_{train_TRAIN,val_VAL}). Together with small --opts they make a seconds-long run.
--coco-json / --coco-images train and evaluate on the same COCO-format images instead (an
overfitting check on real data, e.g. tiny-coco with configs/diffinst.tiny_coco.res18.yaml).
"""
import argparse
import json
import logging
import os
import shutil
import statistics
import time

from detectron2.utils.logger import setup_logger

from diffusiondet.data.datasets import datasets_root, ensure_synthetic_crowd, register_synthetic_crowd
from diffusiondet.engine import Trainer, load_model_weights
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike

logger = logging.getLogger("diffusiondet.main_job")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/diffdet.synthetic.res18.yaml")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--boxes", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--retrain", action="store_true", help="delete OUTPUT_DIR and train from scratch")
    parser.add_argument("--output-dir", default=None, help="OUTPUT_DIR (default: the config's)")
    parser.add_argument("--max-iter", type=int, default=None, help="SOLVER.MAX_ITER (default: the config's)")
    parser.add_argument("--num-images", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="train and evaluate on the first TRAIN / VAL synthetic images (default: all)")
    parser.add_argument("--coco-json", default=None,
                        help="train and evaluate on this COCO json instead of the synthetic set (with --coco-images)")
    parser.add_argument("--coco-images", default=None, help="image folder of --coco-json")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train once per SEED (in OUTPUT_DIR/seed_S) and print mean ± std over them")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser.parse_args()


def data_selection(num_images):
    """The synthetic data to use: (root, {name: (split, count)}, config overrides selecting it);
    (None, None, []) for the built-in 600 / 100 images."""
    if num_images is None:
        return None, None, []
    num_train, num_val = num_images
    train, val = f"synthetic_crowd_train_{num_train}", f"synthetic_crowd_val_{num_val}"
    splits = {train: ("train", num_train), val: ("val", num_val)}
    root = os.path.join(datasets_root(), f"synthetic_crowd_{num_train}_{num_val}")
    return root, splits, ["DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,)]


def train(cfg):
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter >= cfg.SOLVER.MAX_ITER:
        logger.info("Training already finished in %s; evaluating only", cfg.OUTPUT_DIR)
    else:
        trainer.train()
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def evaluate(config_file, opts, weights, steps, boxes):
    """AP of ``weights`` at (steps, boxes); the sampling noise of each image comes from (SEED,
    image id), so the row does not depend on the batch size or on the rows before it."""
    cfg = build_config(config_file, opts, steps=steps, boxes=boxes)
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = Trainer.build_model(cfg)
    load_model_weights(model, cfg)  # safe unpickling, architecture, shapes, finite values
    start = time.perf_counter()
    results = Trainer.test(cfg, model)
    elapsed = time.perf_counter() - start
    results = next(iter(results.values())) if "bbox" not in results else results
    bbox = results["bbox"]
    row = {"steps": steps, "boxes": boxes, "AP": bbox["AP"], "AP50": bbox["AP50"], "AP75": bbox["AP75"]}
    if "segm" in results:
        row.update({"mask AP": results["segm"]["AP"], "mask AP50": results["segm"]["AP50"]})
    return row, elapsed


METRICS = ("AP", "AP50", "AP75", "mask AP", "mask AP50")


def format_table(rows):
    """Markdown AP table; a cell is "x.x", or "mean ± std" where a row holds per-seed lists."""
    metrics = [m for m in METRICS if m in rows[0]]
    lines = ["| steps | boxes | " + " | ".join(metrics) + " |", "|---:" * (2 + len(metrics)) + "|"]
    for r in rows:
        cells = [_cell(r[m]) for m in metrics]
        lines.append(f"| {r['steps']} | {r['boxes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, list):
        spread = statistics.stdev(value) if len(value) > 1 else 0.0
        return f"{statistics.mean(value):.1f} ± {spread:.1f}"
    return f"{value:.1f}"


def run_one(args, opts, root, splits, uses_synthetic):
    """Data, training and the (steps, boxes) evaluations of one config; returns (cfg, rows, seconds)."""
    cfg = build_config(args.config_file, opts)
    if args.retrain and os.path.isdir(cfg.OUTPUT_DIR):
        shutil.rmtree(cfg.OUTPUT_DIR)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    cfg.freeze()
    start = time.perf_counter()
    if splits is not None:
        register_synthetic_crowd(root, splits)
    if uses_synthetic:
        ensure_synthetic_crowd(root, splits)
    weights = train(cfg)
    seconds = {"data_and_training": time.perf_counter() - start, "evaluation": []}
    rows = []
    for s in args.steps:
        for b in args.boxes:
            row, elapsed = evaluate(args.config_file, opts, weights, s, b)
            rows.append(row)
            seconds["evaluation"].append(elapsed)
    # The table is a function of SEED; the timings are not, so they are kept apart.
    with open(os.path.join(cfg.OUTPUT_DIR, "ap_table.json"), "w") as f:
        json.dump({"seed": cfg.SEED, "rows": rows, "seconds": seconds}, f, indent=2)
    return cfg, rows, seconds


def main():
    args = parse_args()
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="diffusiondet")
    root, splits, opts = data_selection(args.num_images)
    for key, value in (("OUTPUT_DIR", args.output_dir), ("SOLVER.MAX_ITER", args.max_iter)):
        opts += [] if value is None else [key, value]
    uses_synthetic = args.coco_json is None
    if not uses_synthetic:
        # The same images for training and evaluation: an overfitting check on real data.
        opts += ["DATASETS.CUSTOM.TRAIN_JSON", args.coco_json, "DATASETS.CUSTOM.TRAIN_IMAGES", args.coco_images,
                 "DATASETS.CUSTOM.TEST_JSON", args.coco_json, "DATASETS.CUSTOM.TEST_IMAGES", args.coco_images]
    opts += args.opts  # explicit overrides win
    if not args.seeds:
        cfg, rows, seconds = run_one(args, opts, root, splits, uses_synthetic)
        print(f"\n{cfg.MODEL.META_ARCHITECTURE} on {cfg.DATASETS.TEST[0]} ({args.config_file}), SEED {cfg.SEED}\n")
        print(format_table(rows))
        print(f"\nData + training: {seconds['data_and_training']:.0f} s; evaluation per row: "
              + ", ".join(f"{s:.0f}" for s in seconds["evaluation"]) + " s")
        return
    base_dir = build_config(args.config_file, opts).OUTPUT_DIR
    per_seed = []
    for seed in args.seeds:
        seed_opts = opts + ["SEED", seed, "OUTPUT_DIR", os.path.join(base_dir, f"seed_{seed}")]
        cfg, rows, seconds = run_one(args, seed_opts, root, splits, uses_synthetic)
        per_seed.append(rows)
    merged = [{**first, **{m: [rows[i][m] for rows in per_seed] for m in METRICS if m in first}}
              for i, first in enumerate(per_seed[0])]
    with open(os.path.join(base_dir, "ap_table_seeds.json"), "w") as f:
        json.dump({"seeds": args.seeds, "rows": merged}, f, indent=2)
    print(f"\n{cfg.MODEL.META_ARCHITECTURE} on {cfg.DATASETS.TEST[0]} ({args.config_file}), "
          f"mean ± std over SEED {' '.join(map(str, args.seeds))}\n")
    print(format_table(merged))


if __name__ == "__main__":
    main()
