#!/usr/bin/env python
"""Evaluate one model at every (steps, boxes, seed): backbone once per image, resumable.

    python tools/sweep.py --config-file configs/diffdet.coco.res50.yaml \
        --steps 1 2 4 8 --boxes 100 300 500 1000 2000 --seeds 0 1 2 \
        --output-dir output/sweep MODEL.WEIGHTS path/to/model.pth

Writes <output-dir>/sweep_results.json (every run's metrics; finished runs are skipped when the
command is repeated), sweep.csv, sweep.md (metric mean ± std over seeds) and three PNG plots.
Works with every evaluator the dataset selects (COCO, LVIS, CrowdHuman) and with DiffusionInst
(bbox and segm metrics in the CSV; --metric segm/AP tabulates and plots mask AP).
"""
import argparse
import os
import sys
import time

from detectron2.utils.logger import setup_logger

from diffusiondet.engine import Trainer, load_model_weights
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs
from diffusiondet.evaluation.sweep import combinations, run_sweep
from diffusiondet.evaluation.sweep_report import write_reports


def argument_parser():
    """The command line (also read by tools/submit_slurm.py --sweep)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--boxes", type=int, nargs="+", default=[100, 300, 500, 1000, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dataset", default="", help="default: the first of DATASETS.TEST")
    parser.add_argument("--output-dir", default="output/sweep")
    parser.add_argument("--group-size", type=int, default=0,
                        help="runs per pass over the data (0 = all; smaller = saved more often)")
    parser.add_argument("--metric", default="",
                        help='"task/name" for the table and plots, e.g. segm/AP (DiffusionInst masks);'
                             ' default bbox/AP, or crowdhuman/AP50 on CrowdHuman')
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser


def parse_args(argv=None):
    return argument_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if min(args.steps + args.boxes) < 1:
        raise ValueError("--steps and --boxes must be >= 1")
    setup_logger(name="diffusiondet")
    cfg = build_config(args.config_file, args.opts)
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    model = Trainer.build_model(cfg).eval()
    load_model_weights(model, cfg)  # an error without weights, or with weights that do not fit
    loader = Trainer.build_test_loader(cfg, dataset)

    def evaluator(c):
        return Trainer.build_evaluator(cfg, dataset, os.path.join(args.output_dir, c.key))

    start = time.perf_counter()
    todo = combinations(args.steps, args.boxes, args.seeds)
    done = run_sweep(model, loader, evaluator, todo, args.output_dir, args.group_size)
    wanted = {c.key: done[c.key] for c in todo}
    paths = write_reports(wanted, args.output_dir, plots=not args.no_plots, metric=args.metric)
    with open(paths["md"]) as f:
        print(f.read())
    print(f"{len(todo)} runs on {dataset} in {time.perf_counter() - start:.1f} s; " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
