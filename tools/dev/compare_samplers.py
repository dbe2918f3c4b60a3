#!/usr/bin/env python
"""AP against the number of model calls for several samplers, on one trained model.

    python tools/dev/compare_samplers.py --config-file configs/diffdet.synthetic.res18.yaml \
        --weights output/synthetic_res18/model_final.pth --calls 1 2 3 4 8 --boxes 300 --seeds 0 1 2

Each sampler is a set of config overrides (``--samplers NAME=KEY:VALUE,KEY:VALUE ...``; default:
DDIM with η = 1 (official) and DDIM with η = 0). ``tools/sweep.py`` evaluates
each one at every call count (backbone once per image, same noise seeds for every sampler) into
``<output-dir>/<name>/``; this script then prints a markdown table of the metric, mean ± std over
seeds, calls × samplers.

Model calls vs ``SAMPLE_STEP``: with the official ensemble and ``SKIP_UNUSED_CALLS`` (defaults),
S > 1 steps make S − 1 calls (the last call's predictions are never used), so c calls are run as
S = c + 1 steps (c = 1 as S = 1).
"""
import argparse
import os
import subprocess
import sys

from diffusiondet.tooling.compare_samplers import parse_sampler, steps_for_calls, summarize

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/, with sweep.py
DEFAULT_SAMPLERS = [
    "ddim_eta1=MODEL.DiffusionDet.SAMPLER_UPDATE:ddim,MODEL.DiffusionDet.DDIM_ETA:1.0",
    "ddim_eta0=MODEL.DiffusionDet.SAMPLER_UPDATE:ddim,MODEL.DiffusionDet.DDIM_ETA:0.0",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--boxes", type=int, default=300, help="boxes per image (one value)")
    parser.add_argument("--seeds", nargs="+", default=["0", "1", "2"])
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    parser.add_argument("--metric", default="bbox/AP")
    parser.add_argument("--output-dir", default="output/compare_samplers")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every sampler")
    args = parser.parse_args(argv)
    samplers = [parse_sampler(s) for s in args.samplers]
    steps = [str(steps_for_calls(c)) for c in args.calls]
    for name, opts in samplers:
        command = [sys.executable, os.path.join(TOOLS, "sweep.py"), "--config-file", args.config_file,
                   "--steps", *steps, "--boxes", str(args.boxes), "--seeds", *args.seeds, "--no-plots",
                   "--metric", args.metric, "--output-dir", os.path.join(args.output_dir, name),
                   "MODEL.WEIGHTS", args.weights, *opts, *args.opts]  # fmt: skip
        print("[compare_samplers]", name, ":", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
    table = summarize(args.output_dir, [n for n, _ in samplers], args.calls, args.metric)
    with open(os.path.join(args.output_dir, "calls_vs_samplers.md"), "w") as f:
        f.write(f"{args.metric}, mean ± std over seeds {args.seeds}, {args.boxes} boxes\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
