#!/usr/bin/env python
"""Export DiffusionDet / DiffusionInst inference to ONNX, then optionally evaluate the file with
onnxruntime and time it against the PyTorch model (docs/deploy.md).

    python tools/export_onnx.py --config-file configs/diffdet.synthetic.res18.yaml \
        --weights output/synthetic_res18/model_final.pth --steps 1 --boxes 100 \
        --image-size 160 160 --batch 4 --output output/onnx/synthetic_1x100.onnx \
        --evaluate onnx eager --benchmark

The graph runs SAMPLING_MODE "graph" (set here) in fp32 on a fixed (batch, 3, H, W) canvas; H and
W are rounded up to the backbone's padded size. Writes --output, and <output>.json with the
AP and images/s measured. KEY VALUE config overrides come last.
"""
import argparse
import json
import os
import sys

import torch
from detectron2.utils.logger import setup_logger

from diffusiondet.engine import Trainer, load_model_weights
from diffusiondet.export import NOISE_MODES, ExportableDetector, OnnxPredictor, canvas_size, export_onnx
from diffusiondet.tooling.onnx_check import benchmark_inputs, evaluate_predictor, images_per_second
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs

# What the export needs whatever the config says (each only trades speed, or is checked later).
EXPORT_OPTS = [
    "MODEL.DiffusionDet.SAMPLING_MODE", "graph",
    "MODEL.DiffusionDet.COMPILE_SAMPLING_STEP", False,
    "MODEL.DiffusionDet.COMPILE_HEAD", False,
    "MODEL.DEVICE", "cpu",
]  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default="", help="checkpoint (default: MODEL.WEIGHTS)")
    parser.add_argument("--steps", type=int, default=None, help="MODEL.DiffusionDet.SAMPLE_STEP, unrolled")
    parser.add_argument("--boxes", type=int, default=None, help="MODEL.DiffusionDet.EVAL_NUM_PROPOSALS")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), required=True,
                        help="canvas height and width: at least the largest network input")
    parser.add_argument("--batch", type=int, default=1, help="images per graph run")
    parser.add_argument("--noise", choices=NOISE_MODES, default="input",
                        help="input: sampling noise is a graph input (reproducible); internal: RandomNormal")
    parser.add_argument("--output", required=True, help="the .onnx file")
    parser.add_argument("--skip-export", action="store_true", help="use the existing --output file")
    parser.add_argument("--evaluate", nargs="+", choices=("onnx", "eager"), default=[],
                        help="AP on --dataset of the ONNX predictor and/or the PyTorch model")
    parser.add_argument("--dataset", default="", help="default: the first of DATASETS.TEST")
    parser.add_argument("--max-images", type=int, default=0, help="evaluate on the first images only")
    parser.add_argument("--benchmark", action="store_true",
                        help="images/s of onnxruntime and of the PyTorch model on the same --batch images")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of --benchmark")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch and onnxruntime threads (default: torch.get_num_threads())")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def exportable_classes(cfg):
    """The export module and predictor classes of the config's meta-architecture."""
    if cfg.MODEL.META_ARCHITECTURE == "DiffusionInst":
        from diffusioninst.export import ExportableDiffusionInst, OnnxInstPredictor

        return ExportableDiffusionInst, OnnxInstPredictor
    return ExportableDetector, OnnxPredictor


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="diffusiondet")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = EXPORT_OPTS + args.opts + (["MODEL.WEIGHTS", args.weights] if args.weights else [])
    cfg = build_config(args.config_file, opts, steps=args.steps, boxes=args.boxes)
    module_cls, predictor_cls = exportable_classes(cfg)
    model = Trainer.build_model(cfg).eval()
    load_model_weights(model, cfg)  # an error without weights, or with weights that do not fit
    height, width = canvas_size(model, *args.image_size)
    results = {"canvas": [height, width], "batch": args.batch, "noise": args.noise,
               "steps": cfg.MODEL.DiffusionDet.SAMPLE_STEP, "boxes": model.eval_num_proposals}  # fmt: skip
    if not args.skip_export:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        export_onnx(module_cls(model, args.batch, height, width, args.noise), args.output)
        print(f"wrote {args.output}: batch {args.batch}, canvas {height}x{width}, noise {args.noise}")
    predictor = predictor_cls(args.output, threads=torch.get_num_threads())
    predictors = {"onnx": predictor, "eager": model}
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    for name in args.evaluate:
        folder = os.path.join(os.path.splitext(args.output)[0] + "_eval", name)
        results[f"AP_{name}"] = evaluate_predictor(cfg, predictors[name], dataset, folder, args.max_images)
    if args.benchmark:
        inputs = benchmark_inputs(cfg, dataset, args.batch, height, width)
        for name, predict in predictors.items():
            results[f"images_per_s_{name}"] = images_per_second(predict, inputs, args.repeats)
        results["threads"] = torch.get_num_threads()
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
