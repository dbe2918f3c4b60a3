#!/usr/bin/env python
"""`make demo-engine`: DiffusionEngine on the embedded synthetic set, on a CPU
(diffusionengine/main_job.py). Trains the tiny text-to-image LDM, then measures on the synthetic
VAL set: the adapter's AP on the trained vs a random frozen U-Net vs the ResNet-18 main job, the
data engine's label precision / recall per δ, ResNet-18 on real vs real + generated data, and the
CPU cost of a labelled image. Prints the tables and writes OUT/engine_table.md,
OUT/engine_results.json and OUT/generated_labels.png.

    python tools/run_engine_job.py [--out output/engine] [--quick] [--restart]
        [--adapter-iters N] [--mix-iters N] [--gen-images N] [--label-images N]

Every stage is seeded and stored in OUT/stages/: a second run reuses finished stages, a killed
run continues where it stopped. --quick is a smoke run (tens of seconds, default OUT
output/engine_quick).
"""
import argparse
import dataclasses

from detectron2.utils.logger import setup_logger

from diffusionengine.main_job import EngineJobSettings, quick_settings, restart, run_engine_job


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="output folder (default output/engine, --quick: output/engine_quick)")
    parser.add_argument("--quick", action="store_true", help="smoke-sized run of every stage")
    parser.add_argument("--restart", action="store_true", help="delete OUT and start over")
    for flag, field in (("--adapter-iters", "adapter_iters"), ("--mix-iters", "mix_iters"),
                        ("--gen-images", "gen_images"), ("--label-images", "label_images")):
        parser.add_argument(flag, type=int, default=None, help=f"default: {getattr(EngineJobSettings, field)}")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="diffusiondet")
    setup_logger(name="diffusionengine")
    out = args.out or ("output/engine_quick" if args.quick else "output/engine")
    settings = quick_settings(out) if args.quick else EngineJobSettings(out_dir=out)
    changes = {f: getattr(args, f) for f in ("adapter_iters", "mix_iters", "gen_images", "label_images")
               if getattr(args, f) is not None}
    settings = dataclasses.replace(settings, **changes)
    if args.restart:
        restart(out)
    run_engine_job(settings)
    with open(f"{out}/engine_table.md") as f:
        print("\n" + f.read())


if __name__ == "__main__":
    main()
