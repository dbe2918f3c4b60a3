"""SLURM jobs through submitit: one task per GPU, the rendezvous read from the allocation, and
preemption or the time limit that loses nothing (docs/cluster.md, tools/submit_slurm.py).

**One task per GPU.** Every rank is a task that SLURM starts (srun), numbers and signals itself.
No launcher sits between SLURM and the ranks, so no signal has to be forwarded and no child's exit
status decoded, and submitit's per-task bookkeeping (logs, result, requeue from task 0) maps one
to one onto ranks. Each task sets its process group up with detectron2's own worker set-up, the
one ``launch`` runs in each process it starts: ranks are what ``tools/train_net.py`` would make.

**Signals in a training job.** submitit's preemption signal (``USR2`` unless the environment
variable ``SUBMITIT_PREEMPT_SIGNAL`` names another; SLURM sends it ``signal_delay_s`` before the
time limit, and at preemption where the cluster sends user signals) and SIGTERM are the
training's stop signals (stop_signal.py): the ranks finish the step, agree, write the
checkpoint, and only then does submitit's handler, which the training had set aside, act. On the
preemption signal it dumps :meth:`ToolJob.checkpoint` (the same command with ``--resume``) and
requeues the job; on SIGTERM (``scancel``, or a preemption that SLURM requeues itself) it dumps
it and exits. Outside the training loop (model building, loading, the final evaluation) and in
evaluation jobs, submitit's handler acts at once: the requeued job starts that part again.
A training that starts again under its job id, whoever requeued it, runs with ``--resume``.
"""
import argparse
import importlib.util
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from detectron2.engine.launch import _distributed_worker
from detectron2.utils import comm

from .checkpoint import atomic_write
from .setup import argument_parser
from .stop_signal import TrainingStopped, add_stop_signal

__all__ = [
    "EVAL", "SWEEP", "TRAIN", "Rendezvous", "ToolJob", "add_slurm_arguments", "load_tool",
    "preempt_signal", "rendezvous", "rendezvous_port", "split_argv", "submit",
]  # fmt: skip

logger = logging.getLogger(__name__)

TRAIN, EVAL, SWEEP = "train", "eval", "sweep"  # tools/train_net.py, its --eval-only, tools/sweep.py
# train_net.py arguments that the allocation decides (rendezvous below), never the user.
DERIVED = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")
PORT_BASE, PORT_SPAN = 10000, 50000  # rendezvous ports: 10000 + job id mod 50000


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom a task joins the job's process group (detectron2's ``launch`` terms)."""

    dist_url: str  # tcp://<first node>:<port>, 127.0.0.1 on one node
    num_machines: int
    machine_rank: int
    gpus_per_machine: int  # tasks per node
    world_size: int
    global_rank: int
    local_rank: int


def rendezvous_port(job_id: str) -> int:
    """The job's TCP port: jobs sharing a first node differ unless their ids differ by 50000·k."""
    digits = re.sub(r"\D", "", str(job_id))
    return PORT_BASE + int(digits or 0) % PORT_SPAN


def rendezvous(env) -> Rendezvous:
    """The rendezvous of the task that ``env`` (a ``submitit.JobEnvironment``) describes.

    Raises ValueError where the tasks are not laid out as detectron2 numbers ranks (the same
    number on every node, consecutive global ranks per node: SLURM's default block distribution).
    """
    nodes, world, rank = env.num_nodes, env.num_tasks, env.global_rank
    if world % nodes:
        raise ValueError(f"{world} tasks on {nodes} nodes: every node must run as many tasks (GPUs)")
    per_node = world // nodes
    if rank != env.node * per_node + env.local_rank:
        raise ValueError(
            f"task {rank} is task {env.local_rank} of node {env.node} ({per_node} per node): ranks must"
            " be numbered node by node (srun --distribution=block, SLURM's default)"
        )
    host = "127.0.0.1" if nodes == 1 else env.hostnames[0]
    url = f"tcp://{host}:{rendezvous_port(env.raw_job_id)}"
    return Rendezvous(url, nodes, env.node, per_node, world, rank, env.local_rank)


def preempt_signal() -> int:
    """The signal on which submitit checkpoints and requeues a job (SIGUSR2 by default)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


def load_tool(path: str):
    """The script ``path`` (a tools/ entry point) as a module, without running its ``__main__``."""
    name = "diffusiondet_tool_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ToolJob(Checkpointable):
    """What each task runs: ``main`` of the script ``tool`` with ``argv`` (the arguments of
    tools/submit_slurm.py that are not SLURM options). The script is loaded when the task starts,
    as an sbatch script would run it, so a requeued job runs the same file.

    ``kind``: TRAIN or EVAL (tools/train_net.py, as many ranks as tasks), SWEEP (tools/sweep.py,
    one task).
    """

    def __init__(self, tool: str, argv: Sequence[str], kind: str):
        if kind not in (TRAIN, EVAL, SWEEP):
            raise ValueError(f"kind {kind!r}: one of {TRAIN}, {EVAL}, {SWEEP}")
        self.tool, self.argv, self.kind = os.path.abspath(tool), list(argv), kind

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """submitit calls this on task 0 before it requeues the job: the same job, and a training
        continues from its last checkpoint. ``--resume`` goes first (after train_net.py's config
        overrides it would be read as one)."""
        resume = self.kind == TRAIN and "--resume" not in self.argv
        return DelayedSubmission(ToolJob(self.tool, ["--resume"] * resume + self.argv, self.kind))

    def __call__(self):
        env = submitit.JobEnvironment()
        tool = load_tool(self.tool)
        if self.kind == SWEEP:  # finished runs are on disk (sweep_results.json): a requeue skips them
            return tool.main(self.argv)
        where = rendezvous(env)
        args = argument_parser().parse_args(self.argv)  # tools/train_net.py's parser
        args.num_gpus, args.num_machines = where.gpus_per_machine, where.num_machines
        args.machine_rank, args.dist_url = where.machine_rank, where.dist_url
        print(f"{env}: {where}", flush=True)  # the task's log, before the training's logger exists
        if self.kind == TRAIN:
            add_stop_signal(preempt_signal())  # submitit's handler waits for the stop checkpoint
        result = []
        started = os.path.join(env.paths.folder, f"{env.job_id}_started")

        def run(args):
            if self.kind == TRAIN:
                # Started again under its job id (requeued by submitit, or by SLURM itself at a
                # preemption or after a node failure): continue from the last checkpoint.
                args.resume = args.resume or os.path.exists(started)
                comm.synchronize()  # every rank has looked before task 0 leaves the mark
                if comm.is_main_process():
                    open(started, "a").close()
            result.append(tool.main(args))

        try:
            if where.world_size == 1:
                run(args)
            else:
                _distributed_worker(
                    where.local_rank, run, where.world_size, where.gpus_per_machine,
                    where.machine_rank, where.dist_url, (args,), timedelta(minutes=args.dist_timeout),
                )  # fmt: skip
        except TrainingStopped as stopped:
            _hand_over(stopped)  # task 0 does not come back from a requeue
            raise
        if isinstance(result[0], dict) and result[0] and comm.is_main_process():
            _write_results(os.path.join(env.paths.folder, f"{env.job_id}_results.json"), result[0])
        return result[0]


def _hand_over(stopped: TrainingStopped) -> None:
    """After the stop checkpoint, submitit's handler (the hook put it back) does what it would
    have done on the signal: on task 0 it dumps :meth:`ToolJob.checkpoint` and requeues (the
    preemption signal) or exits (SIGTERM); elsewhere it returns."""
    handler = getattr(signal.getsignal(preempt_signal()), "__self__", None)
    if not hasattr(handler, "checkpoint_and_try_requeue"):
        return  # no submitit handler (not a submitit job): the stop stands as it is
    if stopped.signum == preempt_signal():
        handler.checkpoint_and_try_requeue(stopped.signum)
    else:
        handler.checkpoint_and_exit(stopped.signum)


def _write_results(path: str, results: dict) -> None:
    """The metrics, whole or not at all (checkpoint.atomic_write): a preempted job leaves none."""
    text = json.dumps(results, indent=1, default=float)
    atomic_write(path, lambda f: f.write(text.encode()))
    logger.info("results: %s", path)


# ------------------------------------------------------------------ the command line


def add_slurm_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """tools/submit_slurm.py's own options (the rest are tools/train_net.py's or tools/sweep.py's)."""
    group = parser.add_argument_group(
        "SLURM (submitit)", "The rendezvous (--num-gpus, --num-machines, --machine-rank, --dist-url)"
        " comes from the allocation: one task (rank) per GPU.",
    )
    group.add_argument("--nodes", type=int, default=1, help="machines (default: 1)")
    group.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per machine, one task each")
    group.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    group.add_argument(
        "--timeout", type=int, default=1440, metavar="MINUTES",
        help="time limit of each run of the job (default: 1440); before it, training checkpoints"
        " and requeues itself",
    )
    group.add_argument("--account", default="", help="SLURM account")
    group.add_argument("--qos", default="", help="SLURM quality of service")
    group.add_argument("--cpus-per-task", type=int, default=0, help="CPUs per GPU (default: the cluster's)")
    group.add_argument(
        "--max-timeouts", type=int, default=3,
        help="requeues at the time limit before the job gives up (preemptions do not count)",
    )
    group.add_argument(
        "--job-dir", default="",
        help="submitit's folder: the job's command, each task's log, the results (default:"
        " OUTPUT_DIR/submitit, or <--output-dir>/submitit with --sweep)",
    )
    group.add_argument(
        "--sweep", action="store_true",
        help="submit tools/sweep.py (one GPU) instead of tools/train_net.py; the other arguments are its",
    )
    group.add_argument(
        "--local", action="store_true",
        help="run the job on this machine through submitit's LocalExecutor (one node; a check of"
        " the job, its signals and requeue without SLURM; on a machine without GPUs each task is a"
        " CPU rank)",
    )
    return parser


def split_argv(argv: Optional[Sequence[str]] = None):
    """``(SLURM options, the tool's arguments)``; the allocation's own arguments are refused."""
    parser = add_slurm_arguments(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    opts, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    derived = [a for a in rest if a.split("=")[0] in DERIVED]
    if derived:
        parser.error(f"{', '.join(derived)}: set by the allocation; use --nodes and --gpus-per-node")
    return opts, rest


def submit(job: ToolJob, opts: argparse.Namespace, name: str, job_dir: str):
    """Submit ``job`` with the resources of ``opts`` (split_argv); returns the submitit job."""
    tasks = 1 if job.kind == SWEEP else opts.gpus_per_node
    if job.kind == SWEEP and (opts.nodes, opts.gpus_per_node) != (1, 1):
        raise ValueError("--sweep runs on one GPU: --nodes 1 --gpus-per-node 1")
    executor = submitit.AutoExecutor(
        folder=job_dir, cluster="local" if opts.local else "slurm",
        slurm_max_num_timeout=opts.max_timeouts, local_max_num_timeout=opts.max_timeouts,
    )  # fmt: skip
    params = dict(name=name, timeout_min=opts.timeout, nodes=opts.nodes, tasks_per_node=tasks,
                  gpus_per_node=opts.gpus_per_node)  # fmt: skip
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    for key in ("partition", "account", "qos"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    executor.update_parameters(**params)
    return executor.submit(job)
