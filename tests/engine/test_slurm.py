"""SLURM through submitit (diffusiondet/engine/slurm.py, tools/submit_slurm.py): the allocation's
environment gives the rendezvous; a preempted 2-rank training (submitit's LocalExecutor, GLOO)
checkpoints, requeues itself with --resume and ends with the weights of the uninterrupted run;
an evaluation job writes its metrics whole."""
import glob
import json
import os
import re
import signal
import time

import pytest
import submitit
import torch
from submitit.helpers import DelayedSubmission

from diffusiondet.engine import Trainer, stop_signal
from diffusiondet.engine.slurm import EVAL, SWEEP, TRAIN, ToolJob, _hand_over, load_tool, preempt_signal
from diffusiondet.engine.slurm import rendezvous, split_argv
from diffusiondet.engine.stop_signal import StopOnSignal, TrainingStopped
from tests.engine.test_exact_resume import CONFIG, MAX_ITER, PERIOD, REPO, _cfg, _equal
from tests.utils import TINY_OPTS

SUBMIT = os.path.join(REPO, "tools", "submit_slurm.py")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
ECHO_TOOL = os.path.join(REPO, "tests", "engine", "slurm_echo_tool.py")

# Task 11 of a 2 x 8 GPU job, as `srun` sets its environment (recorded; the GPU and CPU
# variables are not read, they are here as a task sees them).
SLURM_TASK_11 = {
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "diffdet.coco.res50",
    "SLURM_JOB_NODELIST": "node[012-013]",
    "SLURM_NODELIST": "node[012-013]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_NPROCS": "16",
    "SLURM_TASKS_PER_NODE": "8(x2)",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURMD_NODENAME": "node013",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_CPUS_PER_TASK": "10",
    "SLURM_STEP_ID": "0",
}


def _slurm_env(monkeypatch, **changes):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    for key, value in {**SLURM_TASK_11, **changes}.items():
        monkeypatch.setenv(key, value)
    return submitit.JobEnvironment()


@pytest.mark.parametrize("nodelist, first", [("node[012-013]", "node012"), ("gpu-b7,gpu-a[03]", "gpu-b7")])
def test_a_two_node_allocation_gives_the_rendezvous(monkeypatch, nodelist, first):
    def task(**changes):
        return rendezvous(_slurm_env(monkeypatch, **{"SLURM_JOB_NODELIST": nodelist, "SLURM_NODELIST": nodelist,
                                                     **changes}))  # fmt: skip

    where = task()
    assert where.dist_url == f"tcp://{first}:14242"  # the first node; port 10000 + job id
    assert (where.num_machines, where.machine_rank, where.gpus_per_machine) == (2, 1, 8)
    assert (where.world_size, where.global_rank, where.local_rank) == (16, 11, 3)
    task0 = task(SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    assert task0.dist_url == where.dist_url and (task0.machine_rank, task0.global_rank) == (0, 0)
    assert task(SLURM_JOB_ID="4243").dist_url == f"tcp://{first}:14243"  # the next job: another port
    one_node = task(SLURM_JOB_NODELIST="node012", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="8", SLURM_PROCID="3",
                    SLURM_NODEID="0")  # fmt: skip
    assert one_node.dist_url == "tcp://127.0.0.1:14242" and (one_node.world_size, one_node.machine_rank) == (8, 0)


def test_ranks_not_numbered_node_by_node_are_refused(monkeypatch):
    # --distribution=cyclic: task 1 on the second node; detectron2 groups ranks by node.
    env = _slurm_env(monkeypatch, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NODEID="1")
    with pytest.raises(ValueError, match="numbered node by node"):
        rendezvous(env)
    with pytest.raises(ValueError, match="as many tasks"):
        rendezvous(_slurm_env(monkeypatch, SLURM_NTASKS="15"))


def test_slurm_options_are_split_from_the_tools_and_the_allocations_own_refused():
    opts, rest = split_argv(["--config-file", "c.yaml", "--nodes", "2", "--eval-only", "MODEL.WEIGHTS",
                             "w.pth", "--gpus-per-node", "4", "--partition", "gpu"])  # fmt: skip
    assert (opts.nodes, opts.gpus_per_node, opts.partition, opts.sweep) == (2, 4, "gpu", False)
    assert rest == ["--config-file", "c.yaml", "--eval-only", "MODEL.WEIGHTS", "w.pth"]
    for derived in (["--num-gpus", "8"], ["--dist-url=tcp://x:1"]):
        with pytest.raises(SystemExit):
            split_argv(["--config-file", "c.yaml", *derived])


def test_a_requeued_training_resumes_and_an_evaluation_or_sweep_starts_again():
    argv = ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "6"]
    requeued = ToolJob(TRAIN_NET, argv, TRAIN).checkpoint()
    assert isinstance(requeued, DelayedSubmission) and isinstance(requeued.function, ToolJob)
    # First: after the config overrides, train_net.py would read it as one more override.
    assert requeued.function.argv == ["--resume", *argv]
    assert requeued.function.checkpoint().function.argv == ["--resume", *argv]  # once
    for kind in (EVAL, SWEEP):  # --eval-only --resume would evaluate OUTPUT_DIR's last checkpoint
        assert ToolJob(TRAIN_NET, argv, kind).checkpoint().function.argv == argv


def test_the_sbatch_script_asks_for_one_task_per_gpu_and_the_signal_before_the_limit(tmp_path, monkeypatch):
    # Stand-ins for SLURM's commands: submitit looks for srun, and submits with sbatch.
    (tmp_path / "bin").mkdir()
    for name, text in (("srun", "exit 0"), ("sbatch", "echo Submitted batch job 4242")):
        (tmp_path / "bin" / name).write_text(f"#!/bin/sh\n{text}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    job = load_tool(SUBMIT).main(["--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--timeout", "4320",
                                  "--account", "vision", "--qos", "high", "--config-file", "configs/diffdet.coco.res50.yaml",
                                  "OUTPUT_DIR", str(tmp_path / "coco")])  # fmt: skip
    assert job.job_id == "4242"
    script = (tmp_path / "coco" / "submitit" / "4242_submission.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=4320",
                 "--account=vision", "--qos=high", f"--signal={submitit.JobEnvironment.USR_SIG}@90"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, script
    submitted = DelayedSubmission.load(tmp_path / "coco" / "submitit" / "4242_submitted.pkl").function
    assert (submitted.tool, submitted.kind) == (TRAIN_NET, TRAIN)
    assert submitted.argv == ["--config-file", "configs/diffdet.coco.res50.yaml", "OUTPUT_DIR", str(tmp_path / "coco")]


class _SubmititHandler:
    """What submitit installs on its signals (job_environment.SignalHandler), recording calls."""

    def __init__(self):
        self.calls = []

    def checkpoint_and_try_requeue(self, signum, frame=None):
        self.calls.append(("requeue", signum))

    def checkpoint_and_exit(self, signum, frame=None):
        self.calls.append(("exit", signum))


def test_after_the_stop_checkpoint_submitits_handler_requeues_or_exits():
    handler = _SubmititHandler()
    before = signal.signal(preempt_signal(), handler.checkpoint_and_try_requeue)
    try:
        _hand_over(TrainingStopped(preempt_signal(), 2, "model_0000002.pth"))
        _hand_over(TrainingStopped(signal.SIGTERM, 2, "model_0000002.pth"))  # scancel: no requeue
    finally:
        signal.signal(preempt_signal(), before)
    assert handler.calls == [("requeue", preempt_signal()), ("exit", signal.SIGTERM)]


def test_the_requeue_signal_wins_over_sigterm_and_forked_workers_ignore_both(tmp_path):
    hook = StopOnSignal(checkpointer=None, signals=(signal.SIGTERM, signal.SIGUSR2))
    hook.trainer = type("T", (), {"iter": 3})()
    hook._record(signal.SIGUSR2, None)
    hook._record(signal.SIGTERM, None)  # SLURM's preemption: SIGTERM and the user signal
    assert hook.received == signal.SIGUSR2 and hook._precedence(hook.received) == 2
    worker = StopOnSignal(checkpointer=None, signals=(signal.SIGTERM,))
    worker._pid = -1  # the handler as a forked loader worker inherits it
    worker._record(signal.SIGTERM, None)
    assert worker.received == 0


def _descendants(pid):
    """Every process under ``pid`` (from /proc): a job step's processes, loader workers included."""
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _opts(data, output_dir):
    """tests/engine/test_exact_resume.py's _job run: the same weights as ``straight_run``."""
    json_file, image_root = data
    return [*map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5", "DATASETS.TEST", "()",
            "DATASETS.CUSTOM.TRAIN_JSON", json_file, "DATASETS.CUSTOM.TRAIN_IMAGES", image_root,
            "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
            "DATALOADER.NUM_WORKERS", "1", "SEED", "11", "OUTPUT_DIR", str(output_dir)]  # fmt: skip


def _wait(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.05)


def test_preempted_training_checkpoints_requeues_and_ends_with_the_uninterrupted_weights(
    tiny_data, straight_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, jobs = tmp_path / "run", tmp_path / "jobs"
    job = load_tool(SUBMIT).main(["--local", "--gpus-per-node", "2", "--timeout", "60", "--job-dir", str(jobs),
                                  "--config-file", CONFIG, *_opts(tiny_data, out)])  # fmt: skip
    try:
        # After iteration 1 (the first periodic checkpoint), SLURM's way: every process of the
        # step gets the signal, the loader workers too.
        _wait(lambda: (out / "last_checkpoint").exists() or job.done(), 120, "a first checkpoint")
        assert not job.done(), "the job ended before the signal"
        for pid in _descendants(job._process.pid):
            os.kill(pid, preempt_signal())
        _wait(job.done, 240, "the requeued job's end")
    finally:
        job.cancel()
    logs = {k: "".join(open(p).read() for p in sorted(glob.glob(str(jobs / f"*_{k}_log.*")))) for k in (0, 1)}
    stopped = [int(w) for w in re.findall(r"training stopped after iteration (\d) of 6", logs[0])]
    assert len(stopped) == 1 and 2 <= stopped[0] <= 4, logs[0][-3000:]
    assert f"training stopped after iteration {stopped[0]} of 6" in logs[1]  # the ranks agreed
    assert "Requeued job" in logs[0] and f"Starting training from iteration {stopped[0] + 1}" in logs[0]
    assert DelayedSubmission.load(job.paths.submitted_pickle).function.argv[0] == "--resume"
    assert job.results() == [None, None]  # both tasks of the requeued job ended normally
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert _equal(final, straight_run(2))


def _local_task(monkeypatch, folder, job_id):
    """The environment of the one task of a submitit LocalExecutor job (what the task runs in)."""
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(folder), "SUBMITIT_LOCAL_JOB_ID": job_id,
           "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
           "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    os.makedirs(folder, exist_ok=True)


def test_a_training_started_again_under_its_job_id_resumes(tmp_path, monkeypatch):
    """SLURM requeues a job itself (a preemption with SIGTERM only, a node failure) with the
    command it has: the job still resumes."""
    _local_task(monkeypatch, tmp_path / "jobs", "78")
    monkeypatch.setattr(stop_signal, "_added", [])  # the job adds its signal to this process's
    job = ToolJob(ECHO_TOOL, ["--config-file", CONFIG], TRAIN)
    assert job() == {"resume": False, "num_gpus": 1}
    assert job() == {"resume": True, "num_gpus": 1}
    assert stop_signal.training_stop_signals() == (signal.SIGTERM, preempt_signal())
    assert ToolJob(ECHO_TOOL, ["--config-file", CONFIG], EVAL)()["resume"] is False  # not a training


def test_an_evaluation_job_writes_its_metrics_whole(tiny_data, tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    torch.save({"model": Trainer.build_model(_cfg(tmp_path)).state_dict()}, weights)
    _local_task(monkeypatch, tmp_path / "jobs", "77")
    argv = ["--config-file", CONFIG, "--eval-only", *map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5",
            "DATASETS.TEST", "('resume_tiny_train',)", "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", "10",
            "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval")]  # fmt: skip
    result = ToolJob(TRAIN_NET, argv, EVAL)()  # what the job's one task runs
    written = json.loads((tmp_path / "jobs" / "77_results.json").read_text())
    assert written == json.loads(json.dumps(result)) and "AP" in written["bbox"]
    assert os.listdir(tmp_path / "jobs") == ["77_results.json"]  # no temporary file left
