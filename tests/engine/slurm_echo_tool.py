"""A stand-in for tools/train_net.py in tests/engine/test_slurm.py: ``main`` returns what it got."""


def main(args):
    return {"resume": args.resume, "num_gpus": args.num_gpus}
