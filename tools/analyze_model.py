#!/usr/bin/env python
"""Parameters and FLOPs of a config's model, per component, per call and per image.

    python tools/analyze_model.py --config-file configs/diffdet.coco.res50.yaml --steps 4 \\
        --boxes 500 --image-size 800 1333 [KEY VALUE ...]

Prints a Markdown table: backbone (incl. FPN; for DiffusionEngine the frozen SD VAE encoder and
U-Net and the channel mapper), the head of one sampling step (all its stages) times the model
calls of S steps, DiffusionInst's mask branch (once per image) and dynamic mask head (once per
detection), and the total. FLOPs = 2 × MACs, counted by torch.utils.flop_counter.FlopCounterMode
on a random-weight model (nothing is loaded; a few seconds on CPU). Every config builds,
DiffusionEngine ones with MODEL.DiffusionEngine.SD_PATH set to a local SD folder (the frozen
model is counted from it). See docs/speed.md, "Parameters and FLOPs".
"""
import argparse

from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike
from diffusionengine.model_analysis import analyze_config
from diffusiondet.tooling.model_analysis import format_analysis


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--steps", type=int, help="S, DDIM sampling steps (default: the config's SAMPLE_STEP)")
    parser.add_argument("--boxes", type=int, help="N, boxes per image (default: the config's eval boxes)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                        help="network input height and width before padding (default: 800 1333)")
    parser.add_argument("--detections", type=int,
                        help="M, detections per image that get masks (default: the model's cap, or N)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
    analysis = analyze_config(cfg, args.steps, args.boxes, args.image_size, args.detections)
    print(format_analysis(analysis, f"## {args.config_file}\n"))


if __name__ == "__main__":
    main()
