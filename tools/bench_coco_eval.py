#!/usr/bin/env python
"""Time COCO / LVIS evaluation with pycocotools (or the lvis API) and with faster-coco-eval, and
check that both give the same numbers (docs/evaluation.md, "Evaluation backend").

    python tools/bench_coco_eval.py --gt annotations.json --dt coco_instances_results.json
    python tools/bench_coco_eval.py --synthetic-images 5000 --out-dir output/bench_coco_eval
    python tools/bench_coco_eval.py --synthetic-images 2000 --lvis --out-dir output/bench_lvis_eval

--dt is a COCO result list (detectron2's COCOEvaluator writes coco_instances_results.json, the
LVISEvaluator lvis_instances_results.json). --synthetic-images writes a made-up case (no images:
non-square sizes, crowd regions, polygon masks; see diffusiondet/evaluation/synthetic_coco.py) to
--out-dir and times that. Prints a Markdown table: seconds per backend, speed-up, and the largest
absolute difference of the summary stats (12 COCO stats, or the 9 LVIS APs, as fractions).
"""
import argparse

from diffusiondet.evaluation.backend_benchmark import benchmark_backends, markdown_table, write_synthetic_case
from diffusiondet.utils.cpu_info import describe_cpu


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", default="", help="annotation json (COCO or LVIS)")
    parser.add_argument("--dt", default="", help="detection json (a COCO result list)")
    parser.add_argument("--synthetic-images", type=int, default=0, help="generate a case with this many images")
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--categories", type=int, default=80)
    parser.add_argument("--lvis", action="store_true", help="synthetic case in LVIS format (r / c / f, federated)")
    parser.add_argument("--no-masks", action="store_true", help="synthetic detections without masks (bbox only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="output/bench_coco_eval", help="where a synthetic case is written")
    parser.add_argument("--tasks", nargs="+", choices=("bbox", "segm"), help="default: bbox, and segm with masks")
    parser.add_argument("--max-dets", type=int, default=None, help="per-image cap (default 100 COCO, 300 LVIS)")
    args = parser.parse_args(argv)
    synthetic, files = args.synthetic_images > 0, bool(args.gt and args.dt)
    if not ((synthetic and not (args.gt or args.dt)) or (files and not synthetic)):
        parser.error("give either --gt and --dt, or --synthetic-images")
    return args


def main(argv=None):
    args = parse_args(argv)
    gt, dt = args.gt, args.dt
    if args.synthetic_images:
        gt, dt = write_synthetic_case(args.out_dir, num_images=args.synthetic_images,
                                      dets_per_image=args.dets_per_image, num_categories=args.categories,
                                      seed=args.seed, masks=not args.no_masks, lvis=args.lvis)  # fmt: skip
    print(f"{describe_cpu()}\n{gt}\n{dt}\n")
    print(markdown_table(benchmark_backends(gt, dt, tasks=args.tasks, max_dets=args.max_dets)))


if __name__ == "__main__":
    main()
