"""``python -m tests.engine.killed_training --kill-after N [train_net.py arguments]``

What ``tools/train_net.py`` does for training, plus a hook on rank 0 that SIGKILLs the whole
process group (every rank, every loader worker, the launcher) once iteration N has finished:
what a scheduler or the kernel's OOM killer does to a job, at a known iteration.
"""
import os
import signal
import sys
from datetime import timedelta

from detectron2.engine import HookBase, default_setup, launch
from detectron2.utils import comm

from diffusiondet.engine import Trainer, argument_parser
from diffusioninst import build_config


class KillJob(HookBase):
    def __init__(self, after_iter: int):
        self.after_iter = after_iter

    def after_step(self):
        # After the hooks registered before this one (the checkpointer among them) have run.
        if self.trainer.iter == self.after_iter and comm.is_main_process():
            os.killpg(os.getpgrp(), signal.SIGKILL)


def _main(args, kill_after):
    cfg = build_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.register_hooks([KillJob(kill_after)])
    trainer.train()


if __name__ == "__main__":
    kill_after = int(sys.argv[2]) if sys.argv[1:2] == ["--kill-after"] else sys.exit("--kill-after N first")
    args = argument_parser().parse_args(sys.argv[3:])
    launch(_main, args.num_gpus, dist_url="auto", args=(args, kill_after), timeout=timedelta(minutes=2))
