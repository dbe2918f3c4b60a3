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

Beside ap_table.json, OUTPUT_DIR gets ap_vs_steps_boxes.png (AP against steps, one line per
boxes value; with --seeds also in the base OUTPUT_DIR, with mean ± std bands) and
predictions.png (the first 6 validation images with the detections of the row of highest AP,
score >= 0.3, masks too for DiffusionInst). On a terminal, data generation, training, each
evaluation and the sweep show progress bars with an ETA on stderr (DIFFUSIONDET_PROGRESS=1 / 0
forces them on / off; diffusiondet/utils/progress.py).

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
import os
import shutil
import time

from detectron2.utils.logger import setup_logger

from diffusiondet.data.datasets import ensure_synthetic_crowd, register_synthetic_crowd
from diffusiondet.tooling.main_job import data_selection, evaluate, format_table, merge_seed_rows, train
from diffusiondet.tooling.main_job_figures import best_row, write_ap_figure, write_predictions_figure
from diffusiondet.utils.progress import progress_bar
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike


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
    pairs = [(s, b) for s in args.steps for b in args.boxes]
    for s, b in progress_bar(pairs, desc="(steps, boxes) sweep", unit="row"):
        row, elapsed = evaluate(build_config(args.config_file, opts, steps=s, boxes=b), weights)
        rows.append(row)
        seconds["evaluation"].append(elapsed)
    start = time.perf_counter()
    write_figures(args, opts, cfg, weights, rows)
    seconds["figures"] = time.perf_counter() - start
    # The table is a function of SEED; the timings are not, so they are kept apart.
    with open(os.path.join(cfg.OUTPUT_DIR, "ap_table.json"), "w") as f:
        json.dump({"seed": cfg.SEED, "rows": rows, "seconds": seconds}, f, indent=2)
    return cfg, rows, seconds


def write_figures(args, opts, cfg, weights, rows):
    """OUTPUT_DIR/ap_vs_steps_boxes.png, and OUTPUT_DIR/predictions.png: the first validation
    images with the detections of the best row (diffusiondet/tooling/main_job_figures.py)."""
    name = f"{cfg.MODEL.META_ARCHITECTURE} on {cfg.DATASETS.TEST[0]}, SEED {cfg.SEED}"
    write_ap_figure(rows, os.path.join(cfg.OUTPUT_DIR, "ap_vs_steps_boxes.png"), name)
    best = best_row(rows)
    best_cfg = build_config(args.config_file, opts, steps=best["steps"], boxes=best["boxes"])
    write_predictions_figure(best_cfg, weights, os.path.join(cfg.OUTPUT_DIR, "predictions.png"), ap=best["AP"])


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
    merged = merge_seed_rows(per_seed)
    with open(os.path.join(base_dir, "ap_table_seeds.json"), "w") as f:
        json.dump({"seeds": args.seeds, "rows": merged}, f, indent=2)
    write_ap_figure(merged, os.path.join(base_dir, "ap_vs_steps_boxes.png"),
                    f"{cfg.MODEL.META_ARCHITECTURE} on {cfg.DATASETS.TEST[0]}, mean \u00b1 std over "
                    f"{len(args.seeds)} seeds")
    print(f"\n{cfg.MODEL.META_ARCHITECTURE} on {cfg.DATASETS.TEST[0]} ({args.config_file}), "
          f"mean ± std over SEED {' '.join(map(str, args.seeds))}\n")
    print(format_table(merged))


if __name__ == "__main__":
    main()
