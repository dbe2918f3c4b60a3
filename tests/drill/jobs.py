"""The fault drill's child processes: cases that need a process of their own (one they kill, or a
2-process job through detectron2's launch) start one of these with :func:`start`.

    python -m tests.drill.jobs distributed WORKDIR FAULT  # 2-process training, rank 1 provokes FAULT
    python -m tests.drill.jobs light WORKDIR              # 2 processes, no model: NaN vote, failure
    python -m tests.drill.jobs hard_kill WORKDIR          # training; the 2nd save dies half-way
"""
import argparse
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def start(job, workdir, *args, timeout):
    """Run ``job`` in a child process; returns the finished ``CompletedProcess`` (text output)."""
    # From the repository root: `python -m` puts it on the child's sys.path, which is what makes
    # the tests package importable there (and in the processes that launch spawns from it).
    cmd = [sys.executable, "-m", "tests.drill.jobs", job, workdir, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def distributed(workdir, fault):
    from . import distributed as cases

    cases.run_job(workdir, fault)


def light(workdir):
    from detectron2.engine import launch

    from . import distributed as cases

    launch(cases._light_worker, 2, dist_url="auto")
    print("JOB FINISHED", flush=True)


def hard_kill(workdir):
    import torch

    from . import training

    trainer = training.tiny_trainer(workdir, "out", 3, 1)
    torch.save = training._aborting_torch_save(None, after_calls=1)  # the 2nd save dies half-way
    trainer.train()


JOBS = {"distributed": distributed, "light": light, "hard_kill": hard_kill}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("workdir")
    parser.add_argument("args", nargs="*", help="the job's own arguments (distributed: FAULT)")
    args = parser.parse_args(argv)
    # Work in the case's folder, as the jobs always have: whatever a job writes relative to its
    # working directory stays out of the checkout and goes with the case's temporary folder.
    os.chdir(args.workdir)
    JOBS[args.job](args.workdir, *args.args)


if __name__ == "__main__":
    main()
