#!/usr/bin/env python
"""Where the time goes: torch.profiler tables and timings behind the README's speed figures.

    python tools/dev/profile_speed.py head       # one head call, roi_align vs fixed-shape pooling
    python tools/dev/profile_speed.py train      # one training iteration (2 images of 512², default path)
    python tools/dev/profile_speed.py backbone   # backbone with and without FOLD_FROZEN_BN

R-50 COCO config with random weights on CPU unless --config-file / trailing KEY VALUE say
otherwise; --height/--width set the image (800×1216), --boxes the head's boxes (500).
"""
import argparse
import sys

import torch

from detectron2.modeling import build_model

from diffusioninst import build_config
from diffusiondet.engine import build_optimizer
from diffusiondet.modeling.acceleration.frozen_bn_folding import FoldedFrozenBNConv2d
from diffusiondet.tooling.bench_timing import best_of
from diffusiondet.tooling.bench_training import random_images, training_batch


def profile_table(fn, rows: int) -> str:
    fn()
    with torch.profiler.profile() as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.no_grad()
def head(model, args) -> None:
    images, _ = model.preprocess_image(random_images(1, args.height, width=args.width))
    features = model.extract_features(images)
    g = torch.Generator().manual_seed(0)
    h, w = images.image_sizes[0]
    xy = torch.rand(1, args.boxes, 2, generator=g) * torch.tensor([w, h]) * 0.8
    boxes = torch.cat([xy, xy + 8 + torch.rand(1, args.boxes, 2, generator=g) * min(h, w) / 3], -1)
    t = torch.tensor([999])
    for fixed in (False, True):
        model.head.use_fixed_shape_pooling(fixed)
        call = lambda: model.head(features, boxes, t)  # noqa: E731
        print(f"\n## head, {args.boxes} boxes, fixed-shape pooling {fixed}: best of 3 {best_of(call, model.device, 3):.3f} s")
        print(profile_table(call, args.rows))
    model.head.use_fixed_shape_pooling(False)


def train(model, cfg, args) -> None:
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = training_batch(cfg, 512)

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    print(f"\n## one training iteration (2 images of 512², {model.num_proposals} proposals)")
    print(profile_table(step, args.rows))


@torch.no_grad()
def backbone(model, args) -> None:
    images, _ = model.preprocess_image(random_images(1, args.height, width=args.width))
    folded = [m for m in model.backbone.modules() if isinstance(m, FoldedFrozenBNConv2d)]
    for fold in (False, True):
        for layer in folded:
            layer.fold = fold
        seconds = best_of(lambda: model.backbone(images.tensor), model.device, 3)
        print(f"backbone {args.height}x{args.width}, FOLD_FROZEN_BN {fold}: best of 3 {seconds:.3f} s "
              f"({len(folded)} folding convolutions)")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["head", "train", "backbone"])
    parser.add_argument("--config-file", default="configs/diffdet.coco.res50.yaml")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--boxes", type=int, default=500)
    parser.add_argument("--rows", type=int, default=12, help="profiler table rows")
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = parser.parse_intermixed_args(argv)  # KEY VALUE pairs may follow the options
    cfg = build_config(args.config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *args.opts])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    {"head": lambda: head(model, args), "train": lambda: train(model, cfg, args),
     "backbone": lambda: backbone(model, args)}[args.part]()  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
