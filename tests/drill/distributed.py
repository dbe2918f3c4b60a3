"""Fault-drill cases: distributed (2-process GLOO training on CPU through detectron2's launch).

A job runs in a subprocess with a deadline; a fault on rank 1 must end the whole job with an error
naming the process and the fault, well before the deadline (no rank left hanging in a collective).
"""
import os
import re
import signal
import subprocess
import time
from datetime import timedelta

from . import jobs
from .common import Case, check

DEADLINE_S = 240  # the drill gives up here; a handled fault ends the job far sooner
FAULT_AT = 1  # iteration after which rank 1 misbehaves (iteration 0 proved the job works)
STALL_TIMEOUT_S = 20  # --dist-timeout of the "stalls" case (default: 30 min, detectron2's)

def run_job(workdir, fault):
    """Runs in the job subprocess (``jobs.py``): 2 processes train 4 iterations; rank 1 provokes
    ``fault``."""
    from detectron2.engine import launch

    from diffusiondet.engine import argument_parser

    from .training import tiny_data

    tiny_data(workdir)  # once, before the workers read it
    # What tools/train_net.py does with --dist-timeout (the default, 30 min, in the other cases).
    cli = ["--dist-timeout", str(STALL_TIMEOUT_S / 60)] if fault == "stall" else []
    minutes = argument_parser().parse_args(cli).dist_timeout
    launch(_worker, 2, dist_url="auto", args=(workdir, fault), timeout=timedelta(minutes=minutes))
    print("JOB FINISHED", flush=True)


def _worker(workdir, fault):
    import torch
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from diffusiondet.engine import Trainer, build_config

    from .training import CONFIG, tiny_opts

    cfg = build_config(CONFIG, tiny_opts(workdir, "out", 4, 100, cli=False))
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)

    class Fault(HookBase):
        def after_step(self):
            if comm.get_rank() != 1 or self.trainer.iter != FAULT_AT:
                return
            if fault == "raise":
                raise RuntimeError(f"drill: injected failure on rank 1 at iteration {FAULT_AT}")
            if fault == "exit":
                os._exit(3)
            if fault == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "stall":
                time.sleep(10 * DEADLINE_S)  # alive but stuck (a deadlock, a dead NFS mount...)

    if fault == "nan":
        def nan_on_rank1(iteration, loss_dict):
            if comm.get_rank() == 1 and iteration == FAULT_AT:
                return {**loss_dict, "loss_giou": loss_dict["loss_giou"] * float("nan")}
            return loss_dict

        trainer.loss_hook = nan_on_rank1
    trainer.register_hooks([Fault()])
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.module.parameters()])
    replicas = comm.all_gather(weights)
    assert torch.equal(replicas[0], replicas[1]) and torch.isfinite(weights).all(), "replicas differ"
    print(f"rank {comm.get_rank()}: nonfinite_steps={trainer.nonfinite_steps}", flush=True)


def _light_worker():
    """No model: rank 1 reports a NaN (every rank must see it), then fails while rank 0 waits in
    the next all-reduce, as a surviving rank does in DDP's gradient all-reduce."""
    import torch
    from detectron2.utils import comm

    from diffusiondet.engine.train_loop import ranks_with_nonfinite

    seen = ranks_with_nonfinite(comm.get_rank() == 1, torch.device("cpu"))
    print(f"rank {comm.get_rank()} sees {seen} rank(s) with a non-finite loss", flush=True)
    if comm.get_rank() == 1:
        raise RuntimeError("drill: injected failure on rank 1 while rank 0 is in an all-reduce")
    ranks_with_nonfinite(False, torch.device("cpu"))


def light_job(workdir):
    start = time.time()
    proc = jobs.start("light", workdir, timeout=DEADLINE_S)
    seconds = time.time() - start
    # Both processes print to one pipe: their lines may interleave, so match, don't split.
    agreed = sorted(re.findall(r"rank (\d+) sees (\d+) rank\(s\) with a non-finite loss", proc.stdout))
    check(agreed == [("0", "1"), ("1", "1")], f"the ranks do not agree on skipping: {agreed}")
    check(proc.returncode != 0 and "JOB FINISHED" not in proc.stdout, "the job reported success")
    which = _error_line(proc.stderr, "Process 1 terminated")
    what = _error_line(proc.stderr, "RuntimeError: drill: injected failure on rank 1")
    check(bool(which and what), f"no error naming process 1 and the cause: {proc.stderr.strip()[-300:]}")
    check(seconds < DEADLINE_S / 2, f"the job took {seconds:.0f} s to fail")
    return f"both ranks agreed to skip; rank 1 failed while rank 0 waited: job ended in {seconds:.0f} s: {what}"


def _run(workdir, fault):
    start = time.time()
    try:
        proc = jobs.start("distributed", workdir, fault, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        check(False, f"the job hung: still running after {DEADLINE_S} s")
    return proc, time.time() - start


def _error_line(stderr, *needles):
    lines = [line.strip() for line in stderr.splitlines()]
    hits = [line for line in lines if all(n in line for n in needles)]
    return hits[-1] if hits else ""


def _fails_clearly(fault, process_line, cause_line):
    def case(workdir):
        proc, seconds = _run(workdir, fault)
        check(proc.returncode != 0 and "JOB FINISHED" not in proc.stdout,
              f"the job reported success (rc {proc.returncode})")
        which = _error_line(proc.stderr, *process_line)
        what = _error_line(proc.stderr, *cause_line)
        check(bool(which and what), f"no error naming the process {process_line} and the cause "
              f"{cause_line}; stderr ends: {proc.stderr.strip()[-300:]}")
        check(seconds < DEADLINE_S / 2, f"the job took {seconds:.0f} s to fail")
        return f"job ended in {seconds:.0f} s (rc {proc.returncode}): {which}" + (
            f" / {what}" if what != which else "")

    return case


def nan_on_one_rank(workdir):
    proc, seconds = _run(workdir, "nan")
    check(proc.returncode == 0 and "JOB FINISHED" in proc.stdout,
          f"the job failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}")
    counts = sorted(line for line in proc.stdout.splitlines() if "nonfinite_steps=" in line)
    check(counts == ["rank 0: nonfinite_steps=1", "rank 1: nonfinite_steps=1"],
          f"the ranks did not all skip the step: {counts}")
    return f"NaN on rank 1 only: both ranks skipped iteration {FAULT_AT}, replicas identical ({seconds:.0f} s)"


CASES = [
    Case("distributed", "nonfinite_agreement_then_rank_fails_in_allreduce", light_job),
    Case("distributed", "worker_raises", _fails_clearly(
        "raise", ("Process 1 terminated",), ("RuntimeError: drill: injected failure on rank 1",)), slow=True),
    Case("distributed", "worker_exits", _fails_clearly(
        "exit", ("process 1 terminated with exit code 3",), ("exit code 3",)), slow=True),
    Case("distributed", "worker_sigkilled", _fails_clearly(
        "sigkill", ("process 1 terminated with signal SIGKILL",), ("SIGKILL",)), slow=True),
    Case("distributed", "worker_stalls", _fails_clearly(
        "stall", ("Process 0 terminated",), ("Timed out",)), slow=True),
    Case("distributed", "nan_loss_on_one_rank", nan_on_one_rank, slow=True),
]
