#!/usr/bin/env python
"""Diagnose a trained DiffusionInst (diffusioninst/diagnostics.py): one Markdown table per
question on stdout, JSON (and a PNG) in the output directory.

    python tools/diagnose_inst.py [--config-file configs/diffinst.synthetic.res18.yaml]
        [--weights PTH] [--output-dir DIR]
        [--what oracle-masks loss-curves object-sizes stride-ceiling]
        [--num-images TRAIN VAL] [--oracle-t T ...] [--metrics-json JSON] [--opts KEY VALUE ...]

* oracle-masks: COCO box and mask AP on DATASETS.TEST[0] when the model is given the GT boxes
  (GT class, score 1) and predicts only their masks, once per --oracle-t (the timestep the head
  sees; default T-1, that of the single call at SAMPLE_STEP 1, and 0) -> oracle_masks.json;
* loss-curves: the weighted loss terms of the training (metrics.json beside --weights, or
  --metrics-json) summed over stages, with their shares of total_loss at the first and the last
  logged iteration -> loss_curves.json, loss_curves.png;
* object-sizes: GT object sizes of DATASETS.TEST[0] after the test resize, in pixels and in
  cells of the mask stride (the first MODEL.DiffusionInst.MASK_IN_FEATURES level) ->
  object_sizes.json;
* stride-ceiling: COCO mask AP on DATASETS.TEST[0] of the GT masks sent through the mask
  stride and pasted back (what a head predicting every target exactly would score), for
  strides 1, 2, 4 and 8, with "center" and "area" targets (MODEL.DiffusionInst.MASK_TARGET;
  diffusioninst/stride_ceiling.py) -> stride_ceiling.json.

--weights defaults to OUTPUT_DIR/model_final.pth, --output-dir to OUTPUT_DIR/diagnostics;
--num-images selects the first TRAIN / VAL synthetic images as tools/run_main_job.py does.
"""
import argparse
import json
import os

from detectron2.utils.logger import setup_logger

from diffusiondet.data.datasets import ensure_synthetic_crowd, register_synthetic_crowd
from diffusiondet.tooling.main_job import data_selection
from diffusioninst import build_config
from diffusioninst.diagnostics import (
    QUANTILES,
    loss_curves,
    object_size_report,
    oracle_box_mask_evaluation,
    write_loss_figure,
)
from diffusioninst.stride_ceiling import stride_ceiling_ap

WHAT = ("oracle-masks", "loss-curves", "object-sizes", "stride-ceiling")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/diffinst.synthetic.res18.yaml")
    parser.add_argument("--weights", default=None, help="trained weights (default: OUTPUT_DIR/model_final.pth)")
    parser.add_argument("--output-dir", default=None, help="where the JSON and PNG go (default: OUTPUT_DIR/diagnostics)")
    parser.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT), help="the diagnostics to run")
    parser.add_argument("--num-images", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="use the first TRAIN / VAL synthetic images (default: all)")
    parser.add_argument("--oracle-t", type=int, nargs="+", default=None,
                        help="timesteps of the oracle-masks model call (default: T-1 and 0)")
    parser.add_argument("--metrics-json", default=None, help="metrics.json of the training (default: beside --weights)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_oracle(cfg, weights, timesteps, out_dir):
    results, rows = {}, []
    for t in timesteps:
        res = oracle_box_mask_evaluation(cfg, weights, timestep=t, output_folder=os.path.join(out_dir, f"oracle_t{t}"))
        results[str(t)] = res
        segm = res["segm"]
        rows.append([t, f"{res['bbox']['AP']:.1f}"] + [f"{segm[k]:.1f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")])
    print(f"\n### Masks given the GT boxes (GT class, score 1) on {cfg.DATASETS.TEST[0]}\n")
    print(_table(["t", "box AP", "mask AP", "AP50", "AP75", "APs", "APm", "APl"], rows))
    return results


def run_loss_curves(metrics_json, out_dir):
    curves = loss_curves(metrics_json)
    write_loss_figure(curves, os.path.join(out_dir, "loss_curves.png"), metrics_json)
    rows = []
    for name, series in curves["summed"].items():
        share = curves["shares"].get(name)
        cells = ["", ""] if share is None else [f"{share['start']:.3f}", f"{share['end']:.3f}"]
        rows.append([name, f"{series['values'][0]:.4g}", f"{series['values'][-1]:.4g}", *cells])
    first, last = (curves["summed"]["total_loss"]["iterations"][i] for i in (0, -1))
    print(f"\n### Loss terms summed over stages, iteration {first} and {last} ({metrics_json})\n")
    print(_table(["term", "start", "end", "share start", "share end"], rows))
    return curves


def run_object_sizes(cfg, out_dir):
    report = object_size_report(cfg, cfg.DATASETS.TEST[0])
    s = report["mask_stride"]
    h, w = report["mask_map_hw"]
    print(f"\n### GT object sizes of {report['dataset']} after the test resize; mask stride {s} "
          f"(levels {report['mask_in_strides']}), median mask map {h:g} x {w:g} cells\n")
    header = ["measure", "unit"] + [f"q{round(q * 100)}" for q in QUANTILES] + ["< 2 cells", "< 4 cells"]
    rows = []
    for name in ("box_sqrt_area", "box_short_side", "mask_sqrt_area"):
        summary = report[name]
        if not summary["count"]:
            continue
        below = [f"{summary['fraction_below_cells'][c]:.2f}" for c in ("2", "4")]
        for unit in ("px", "cells"):
            rows.append([name, unit] + [f"{v:.1f}" for v in summary[f"quantiles_{unit}"]] + below)
    print(_table(header, rows))
    return report


def run_stride_ceiling(cfg):
    reports = {mode: stride_ceiling_ap(cfg, cfg.DATASETS.TEST[0], mode=mode) for mode in ("center", "area")}
    first = reports["center"]
    print(f"\n### Mask AP of the GT masks through the mask stride ({first['num_objects']} objects of "
          f"{first['dataset']}, GT boxes and classes, score 1; targets sampled at the cell centre or "
          f"averaged over the cell)\n")
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    rows = [[s, mode] + [f"{ap[n]:.1f}" for n in names]
            for mode, report in reports.items() for s, ap in report["by_stride"].items()]
    print(_table(["stride", "targets", *names], rows))
    return reports


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="diffusiondet")
    root, splits, opts = data_selection(args.num_images)
    cfg = build_config(args.config_file, opts + list(args.opts))
    cfg.freeze()
    if splits is not None:
        register_synthetic_crowd(root, splits)
        ensure_synthetic_crowd(root, splits)
    weights = args.weights or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    out_dir = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "diagnostics")
    os.makedirs(out_dir, exist_ok=True)
    if "oracle-masks" in args.what:
        timesteps = args.oracle_t or [cfg.MODEL.DiffusionDet.NUM_TIMESTEPS - 1, 0]
        results = run_oracle(cfg, weights, timesteps, out_dir)
        with open(os.path.join(out_dir, "oracle_masks.json"), "w") as f:
            json.dump({"weights": weights, "by_timestep": results}, f, indent=2)
    if "loss-curves" in args.what:
        metrics_json = args.metrics_json or os.path.join(os.path.dirname(os.path.abspath(weights)), "metrics.json")
        curves = run_loss_curves(metrics_json, out_dir)
        with open(os.path.join(out_dir, "loss_curves.json"), "w") as f:
            json.dump(curves, f)
    if "object-sizes" in args.what:
        report = run_object_sizes(cfg, out_dir)
        with open(os.path.join(out_dir, "object_sizes.json"), "w") as f:
            json.dump(report, f, indent=2)
    if "stride-ceiling" in args.what:
        report = run_stride_ceiling(cfg)
        with open(os.path.join(out_dir, "stride_ceiling.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
