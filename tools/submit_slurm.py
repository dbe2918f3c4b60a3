#!/usr/bin/env python
"""Submit tools/train_net.py (training or --eval-only) or tools/sweep.py to SLURM through submitit.

    python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --timeout 4320 \\
        --config-file configs/diffdet.coco.res50.yaml

One task per GPU; the rendezvous comes from the allocation. Before the time limit, and on
preemption, training writes a checkpoint at an iteration every rank agrees on and the job requeues
itself with --resume: it ends with the weights of an uninterrupted run (docs/cluster.md).
Every other argument is tools/train_net.py's (above), or with --sweep tools/sweep.py's.
"""
import argparse
import os

from diffusiondet.engine import argument_parser
from diffusiondet.engine.slurm import DERIVED, EVAL, SWEEP, TRAIN, ToolJob, add_slurm_arguments, load_tool
from diffusiondet.engine.slurm import split_argv, submit
from diffusionengine import build_config  # DiffusionDet, DiffusionInst and DiffusionEngine configs alike

TOOLS = os.path.dirname(os.path.abspath(__file__))
TRAIN_NET, SWEEP_TOOL = os.path.join(TOOLS, "train_net.py"), os.path.join(TOOLS, "sweep.py")


def parser(sweep):
    """train_net.py's parser (less what the allocation sets), this tool's options, and sweep.py's
    usage for --sweep."""
    sweep_parser = sweep.argument_parser()
    sweep_parser.prog = "submit_slurm.py --sweep [SLURM options]"
    full = argument_parser(epilog=f"{__doc__}\nWith --sweep:\n{sweep_parser.format_usage()}")
    for action in full._actions:
        if set(action.option_strings) & set(DERIVED):
            action.help = argparse.SUPPRESS
    return add_slurm_arguments(full)


def main(argv=None):
    """Submit the job; returns the submitit job (its id, state, result)."""
    opts, rest = split_argv(argv)
    sweep = load_tool(SWEEP_TOOL)
    if opts.sweep:
        args = sweep.argument_parser().parse_args(rest)
        cfg = build_config(args.config_file, args.opts)  # a bad config fails here, not in the queue
        tool, kind, output = SWEEP_TOOL, SWEEP, args.output_dir
    else:
        args = parser(sweep).parse_args(rest)
        cfg = build_config(args.config_file, args.opts, steps=args.steps, boxes=args.boxes)
        tool, kind, output = TRAIN_NET, EVAL if args.eval_only else TRAIN, cfg.OUTPUT_DIR
    job_dir = os.path.abspath(opts.job_dir or os.path.join(output, "submitit"))
    name = os.path.splitext(os.path.basename(args.config_file))[0]
    job = submit(ToolJob(tool, rest, kind), opts, name, job_dir)
    print(f"submitted job {job.job_id} ({kind}, {opts.nodes} x {opts.gpus_per_node if kind != SWEEP else 1})")
    print(f"  outputs and checkpoints: {os.path.abspath(output)}")
    print(f"  logs: {job.paths.stdout} (one per task), {job.paths.stderr}")
    if kind == TRAIN:
        print("  on preemption or at the time limit it checkpoints and requeues itself with --resume")
    return job


if __name__ == "__main__":
    main()
