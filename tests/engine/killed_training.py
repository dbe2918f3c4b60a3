"""``python -m tests.engine.killed_training --kill-after N [train_net.py arguments]``
``python -m tests.engine.killed_training --term-after N [train_net.py arguments]``

What ``tools/train_net.py`` does for training, plus a hook on rank 0 that, once iteration N has
finished, SIGKILLs the whole process group (every rank, every loader worker, the launcher): what
a scheduler or the kernel's OOM killer does to a job, at a known iteration; or sends SIGTERM to
the launcher (itself in a one-process run), which forwards it to every rank: what a scheduler
sends before the kill.
"""
import os
import signal
import sys
import time
from datetime import timedelta

from torch.multiprocessing import ProcessExitedException

from detectron2.engine import HookBase, default_setup, launch
from detectron2.utils import comm

from diffusiondet.engine import Trainer, argument_parser
from diffusiondet.engine.stop_signal import forward_stop_signals
from diffusioninst import build_config


class KillJob(HookBase):
    def __init__(self, after_iter: int):
        self.after_iter = after_iter

    def after_step(self):
        # After the hooks registered before this one (the checkpointer among them) have run.
        if self.trainer.iter == self.after_iter and comm.is_main_process():
            os.killpg(os.getpgrp(), signal.SIGKILL)


class TermJob(HookBase):
    def __init__(self, after_iter: int):
        self.after_iter = after_iter

    def after_step(self):
        if self.trainer.iter == self.after_iter and comm.is_main_process():
            launcher = os.getppid() if comm.get_world_size() > 1 else os.getpid()
            os.kill(launcher, signal.SIGTERM)
            time.sleep(1.0)  # the forwarded signal reaches every rank within the next step


def _main(args, kill_after, how):
    cfg = build_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    trainer.register_hooks([KillJob(kill_after) if how == "--kill-after" else TermJob(kill_after)])
    trainer.train()


if __name__ == "__main__":
    how = sys.argv[1] if sys.argv[1:2] in (["--kill-after"], ["--term-after"]) else None
    if how is None:
        sys.exit("--kill-after N or --term-after N first")
    after = int(sys.argv[2])
    args = argument_parser().parse_args(sys.argv[3:])
    if args.num_gpus > 1:
        forward_stop_signals()  # as tools/train_net.py
    try:
        launch(_main, args.num_gpus, dist_url="auto", args=(args, after, how), timeout=timedelta(minutes=2))
    except ProcessExitedException as stopped:
        sys.exit(stopped.exit_code)
