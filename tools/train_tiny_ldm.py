#!/usr/bin/env python
"""Train the tiny text-to-image latent diffusion model of DiffusionEngine's CPU demo on the
TRAIN split of the embedded synthetic set: the VAE, then the U-Net on its latents
(diffusionengine/tiny_ldm.py). Writes OUT/pipeline (a diffusers folder), OUT/samples.png and
OUT/summary.json.

    python tools/train_tiny_ldm.py [--out output/engine/tiny_ldm] [--vae-steps N] [--unet-steps N]
        [--batch-size B] [--seed S] [--size PX] [--resume | --restart]

Same command, same weights. A killed run continues from OUT/checkpoint.pth when started again
(automatically; --resume insists on a checkpoint, --restart discards it); a finished run returns
at once.
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys
import time

from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES
from diffusionengine.tiny_ldm import TinyLDMConfig, synthetic_train_set, train_tiny_ldm
from diffusionengine.tiny_ldm_samples import write_samples

DEFAULTS = TinyLDMConfig()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/engine/tiny_ldm", help="run folder")
    parser.add_argument("--vae-steps", type=int, default=DEFAULTS.vae_steps, help="VAE optimizer steps")
    parser.add_argument("--unet-steps", type=int, default=DEFAULTS.unet_steps, help="U-Net optimizer steps")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="images per step")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initial weights and every draw")
    parser.add_argument("--size", type=int, default=DEFAULTS.size, help="training image side in pixels")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pth (error if none)")
    group.add_argument("--restart", action="store_true", help="delete OUT and train from scratch")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = TinyLDMConfig(vae_steps=args.vae_steps, unet_steps=args.unet_steps, batch_size=args.batch_size,
                        seed=args.seed, size=args.size, vae_crop=min(DEFAULTS.vae_crop, args.size))
    checkpoint = os.path.join(args.out, "checkpoint.pth")
    if args.resume and not os.path.isfile(checkpoint):
        sys.exit(f"--resume: no checkpoint at {checkpoint}")
    if args.restart and os.path.isdir(args.out):
        shutil.rmtree(args.out)
    data = synthetic_train_set(cfg.size)

    def finish(components, out_dir):
        write_samples(components, out_dir, SYNTHETIC_CROWD_CLASSES, references=data.images[:4], seed=cfg.seed)

    start = time.perf_counter()
    pipeline = train_tiny_ldm(data, args.out, cfg, finish=finish)
    print(f"tiny LDM: {pipeline} ({time.perf_counter() - start:.0f} s this session)")
    with open(os.path.join(args.out, "summary.json")) as f:
        summary = json.load(f)
    print(json.dumps({k: summary[k] for k in ("scaling_factor", "first_loss", "final_loss")}))
    print(f"config: {dataclasses.asdict(cfg)}")


if __name__ == "__main__":
    main()
