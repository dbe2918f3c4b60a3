"""Fault-drill cases: training (kill and resume, kill while saving, non-finite loss, full disk).

The helpers here (tiny synthetic data, tiny training options, train_net.py runs) are shared with
the distributed cases.
"""
import errno
import io
import os
import signal
import subprocess
import sys
import time

from . import jobs
from .common import Case, capture_logs, check, expect_error, expect_logged

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml")
TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")


def tiny_data(workdir):
    """6 synthetic 64x64 training images; returns (json, image folder)."""
    from diffusiondet.data.synthetic import generate_synthetic_crowd

    root = os.path.join(workdir, "data")
    json_file = generate_synthetic_crowd(
        root, split="train", num_images=6, image_size=(64, 64), min_objects=2, max_objects=6, seed=3
    )
    return json_file, os.path.join(root, "train")


def tiny_opts(workdir, output="out", max_iter=3, period=100, *extra, cli=True):
    """Opts of a tiny CPU training on the synthetic data (SEED fixed, no loader workers).

    ``cli``: the data goes through DATASETS.CUSTOM as a user would pass it on the command line;
    in-process runs register it under a name of their own instead, since every case of one drill
    process has its own data and DATASETS.CUSTOM always registers "custom_train".
    """
    from tests.utils import TINY_OPTS

    json_file, images = tiny_data(workdir)
    if cli:
        data = ["DATASETS.CUSTOM.TRAIN_JSON", json_file, "DATASETS.CUSTOM.TRAIN_IMAGES", images]
    else:
        from diffusiondet.data.datasets import register_coco_json

        name = "drill_" + os.path.basename(os.path.normpath(workdir))
        register_coco_json(name, json_file, images)
        data = ["DATASETS.TRAIN", (name,), "MODEL.DiffusionDet.NUM_CLASSES", 5]
    opts = TINY_OPTS + data + [
        "DATASETS.TEST", (), "SOLVER.MAX_ITER", max_iter, "SOLVER.CHECKPOINT_PERIOD", period,
        "SEED", 7, "OUTPUT_DIR", os.path.join(workdir, output), *extra,
    ]
    return [str(o) for o in opts] if cli else opts


def tiny_trainer(workdir, *args):
    """A Trainer of ``tiny_opts(workdir, *args)``, built without detectron2's console logging
    (the drill prints one line per case)."""
    from unittest import mock

    import detectron2.engine.defaults
    from diffusiondet.engine import Trainer, build_config

    cfg = build_config(CONFIG, tiny_opts(workdir, *args, cli=False))
    cfg.freeze()
    with mock.patch.object(detectron2.engine.defaults, "setup_logger", lambda *a, **k: None):
        trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def train_net(workdir, *args, timeout=300):
    cmd = [sys.executable, TRAIN_NET, "--config-file", CONFIG, *map(str, args)]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)


def _load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _last(out):
    with open(os.path.join(out, "last_checkpoint")) as f:
        return f.read().strip()


def _aborting_torch_save(error, after_calls=0):
    """torch.save that works ``after_calls`` times, then writes half of the bytes and fails."""
    import torch

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after_calls:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        if error is None:
            os._exit(137)  # a hard kill: no exception handler, no cleanup
        raise error

    return save


# --- (1) SIGKILL mid-run, then --resume ------------------------------------------------------------

MAX_ITER = 6  # checkpoints after iterations 2 and 5: the kill lands in iterations 3..5


def sigkill_then_resume(workdir):
    # One loader worker: the data position and the augmentations must survive the kill too.
    opts = tiny_opts(workdir, "killed", MAX_ITER, 3, "DATALOADER.NUM_WORKERS", 1)
    out = os.path.join(workdir, "killed")
    with open(os.path.join(workdir, "killed.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, "--config-file", CONFIG, *opts],
                                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(os.path.join(out, "last_checkpoint")) and _last(out) == "model_0000002.pth":
                os.killpg(proc.pid, signal.SIGKILL)  # the job and its loader worker, as a scheduler does
                break
            time.sleep(0.05)
        proc.wait(timeout=60)
    check(proc.returncode == -signal.SIGKILL, f"run was not killed mid-way (rc {proc.returncode})")
    check(not os.path.exists(os.path.join(out, "model_final.pth")), "killed run finished anyway")
    killed_at = _last(out)
    resumed = train_net(workdir, "--resume", *opts)
    check(resumed.returncode == 0, f"--resume failed: {resumed.stderr[-300:]}")
    start = int(killed_at[len("model_"):-len(".pth")]) + 1
    check(f"Starting training from iteration {start}" in resumed.stdout + resumed.stderr,
          f"--resume did not continue from iteration {start} ({killed_at})")
    final = _load(os.path.join(out, "model_final.pth"))
    state = final["trainer"]
    adam_steps = {int(s["step"]) for s in state["_trainer"]["optimizer"]["state"].values()}
    sched_epoch = state["hooks"]["LRScheduler"]["last_epoch"]
    check(state["iteration"] == MAX_ITER - 1 and adam_steps == {MAX_ITER} and sched_epoch == MAX_ITER,
          f"resume lost state: iteration {state['iteration']}, optimizer steps {adam_steps},"
          f" scheduler epoch {sched_epoch} (expected {MAX_ITER - 1}, {{{MAX_ITER}}}, {MAX_ITER})")

    straight = train_net(workdir, *tiny_opts(workdir, "straight", MAX_ITER, 3, "DATALOADER.NUM_WORKERS", 1))
    check(straight.returncode == 0, f"uninterrupted run failed: {straight.stderr[-300:]}")
    import torch

    reference = _load(os.path.join(workdir, "straight", "model_final.pth"))["model"]
    differ = [k for k, v in reference.items() if not torch.equal(v, final["model"][k])]
    check(not differ, f"the resumed run's weights differ from the uninterrupted run's in {len(differ)} of"
                      f" {len(reference)} tensors (first: {differ[:3]})")
    return (f"killed after iter {start - 1}; resumed at {start}, Adam steps and LR epoch {MAX_ITER}/"
            f"{MAX_ITER}; final weights equal to the uninterrupted run's, all {len(reference)} tensors")


def sigterm_then_resume(workdir):
    """SIGTERM to the whole process group mid-run (a scheduler's warning before the kill): the
    job checkpoints at the iteration it is in, exits 143 without a traceback, and resumes exactly."""
    opts = tiny_opts(workdir, "stopped", 40, 100, "DATALOADER.NUM_WORKERS", 1)
    out = os.path.join(workdir, "stopped")
    log_path = os.path.join(workdir, "stopped.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, TRAIN_NET, "--config-file", CONFIG, *opts],
                                cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            with open(log_path) as f:
                if "Starting training from iteration 0" in f.read():
                    break
            time.sleep(0.05)
        time.sleep(0.5)  # into the run (40 iterations take seconds)
        os.killpg(proc.pid, signal.SIGTERM)  # the job and its loader worker, as a scheduler does
        proc.wait(timeout=120)
    with open(log_path) as f:
        log = f.read()
    check(proc.returncode == 128 + signal.SIGTERM, f"rc {proc.returncode}, not 143: {log[-300:]}")
    check("Traceback" not in log, f"a traceback on SIGTERM: {log[log.find('Traceback'):][:300]}")
    check(not os.path.exists(os.path.join(out, "model_final.pth")), "the stopped run finished anyway")
    stopped_at = _last(out)  # no periodic checkpoint (period 100): this file is the stop's
    resumed = train_net(workdir, "--resume", *opts)
    check(resumed.returncode == 0, f"--resume failed: {resumed.stderr[-300:]}")
    straight = train_net(workdir, *tiny_opts(workdir, "straight", 40, 100, "DATALOADER.NUM_WORKERS", 1))
    check(straight.returncode == 0, f"uninterrupted run failed: {straight.stderr[-300:]}")
    import torch

    final = _load(os.path.join(out, "model_final.pth"))["model"]
    reference = _load(os.path.join(workdir, "straight", "model_final.pth"))["model"]
    differ = [k for k, v in reference.items() if not torch.equal(v, final[k])]
    check(not differ, f"the resumed run's weights differ from the uninterrupted run's in {len(differ)} tensors")
    return (f"SIGTERM to the process group: {stopped_at} written, exit 143, no traceback; resumed run's"
            f" final weights equal to the uninterrupted run's, all {len(reference)} tensors")


# --- (2) kill while a checkpoint is being written ----------------------------------------------------


def abort_while_saving(workdir):
    import torch

    trainer = tiny_trainer(workdir)
    out = trainer.cfg.OUTPUT_DIR
    trainer.iter = 4
    trainer.checkpointer.save("model_0000004", iteration=4)
    trainer.checkpointer.save("model_final", iteration=4)
    real_save = torch.save
    torch.save = _aborting_torch_save(KeyboardInterrupt("drill: killed while saving"))
    try:
        for name in ("model_0000007", "model_final"):  # a new name, and overwriting an old one
            try:
                trainer.checkpointer.save(name, iteration=7)
            except KeyboardInterrupt:
                pass
    finally:
        torch.save = real_save
    check(not os.path.exists(os.path.join(out, "model_0000007.pth")), "a torn model_0000007.pth exists")
    check(_load(os.path.join(out, "model_final.pth"))["iteration"] == 4, "model_final.pth was damaged")
    check(_last(out) == "model_final.pth", f"last_checkpoint says {_last(out)!r}")
    leftovers = [f for f in os.listdir(out) if f.endswith(".tmp")]
    resumed = tiny_trainer(workdir)
    resumed.resume_or_load(resume=True)
    check(resumed.start_iter == 5, f"resume starts at {resumed.start_iter}, not 5")
    return (f"two saves aborted half-way: no torn file, model_final.pth and last_checkpoint intact,"
            f" resume starts at 5; {len(leftovers)} temp files left")


def hard_kill_while_saving(workdir):
    proc = jobs.start("hard_kill", workdir, timeout=300)
    check(proc.returncode == 137, f"the save was not killed (rc {proc.returncode}): {proc.stderr[-300:]}")
    out = os.path.join(workdir, "out")
    check(_last(out) == "model_0000000.pth", f"last_checkpoint says {_last(out)!r}")
    check(not os.path.exists(os.path.join(out, "model_0000001.pth")), "a torn model_0000001.pth exists")
    _load(os.path.join(out, "model_0000000.pth"))
    resumed = train_net(workdir, "--resume", *tiny_opts(workdir, "out", 3, 1))
    check(resumed.returncode == 0 and "Starting training from iteration 1" in resumed.stderr + resumed.stdout,
          f"--resume failed: {resumed.stderr[-300:]}")
    return ("process killed (os._exit) half-way through model_0000001.pth: model_0000000.pth and"
            " last_checkpoint intact, --resume continued from iteration 1 to the end")


# --- (3) non-finite losses --------------------------------------------------------------------------


def _nan_loss(at):
    def hook(iteration, loss_dict):
        return {**loss_dict, "loss_giou": loss_dict["loss_giou"] * float("nan")} if at(iteration) else loss_dict

    return hook


def nonfinite_loss_skipped(workdir):
    import torch

    trainer = tiny_trainer(workdir, "out", 2)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.loss_hook = _nan_loss(lambda it: it == 0)
    snapshots = []
    trainer.register_hooks([_Snapshot(snapshots)])
    with capture_logs("diffusiondet") as logs:
        trainer.train()
    line = expect_logged(logs, ["iteration 0", "loss_giou=nan", "skipped"])
    check(all(torch.equal(snapshots[0][k], v) for k, v in initial.items()), "the NaN step changed weights")
    check(any(not torch.equal(snapshots[1][k], v) for k, v in initial.items()), "the next step did not train")
    check(all(torch.isfinite(v).all() for v in trainer.model.state_dict().values()), "NaN in the weights")
    counted = trainer.storage.history("nonfinite_steps").latest()
    check(trainer.nonfinite_steps == 1 and counted == 1, f"nonfinite_steps = {counted}")
    return f"step skipped, nonfinite_steps=1, next step trained; {line}"


def _Snapshot(snapshots):
    """A hook that appends the model's state after every step to ``snapshots``."""
    from detectron2.engine import HookBase

    class Snapshot(HookBase):
        def after_step(self):
            snapshots.append({k: v.clone() for k, v in self.trainer.model.state_dict().items()})

    return Snapshot()


def nonfinite_losses_in_a_row_stop(workdir):
    trainer = tiny_trainer(workdir, "out", 5, 100, "SOLVER.MAX_NONFINITE_STEPS", 1)
    trainer.loss_hook = _nan_loss(lambda it: True)
    return expect_error(trainer.train, names=["SOLVER.MAX_NONFINITE_STEPS=1", "iteration 1", "loss_giou"],
                        exc=(FloatingPointError,))


def _nan_gradient(at):
    """A finite loss term 0 * sqrt(0 * w) whose gradient is 0 * inf = NaN for every weight w of
    the first parameter: the loss check alone lets it through."""
    import torch

    def hook(iteration, loss_dict):
        if not at(iteration):
            return loss_dict
        weight = next(p for p in hook.model.parameters() if p.requires_grad)
        return {**loss_dict, "loss_nan_grad": 0.0 * torch.sqrt((weight * 0).sum())}

    return hook


def nonfinite_gradient_step_skipped(workdir):
    import torch

    trainer = tiny_trainer(workdir, "out", 3)
    hook = _nan_gradient(lambda it: it == 0)
    hook.model = trainer.model
    trainer.loss_hook = hook
    with capture_logs("diffusiondet") as logs:
        trainer.train()
    line = expect_logged(logs, ["non-finite gradient", "iteration 0", "skipped"])
    state = torch.load(os.path.join(trainer.cfg.OUTPUT_DIR, "model_final.pth"))["model"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    check(not bad, f"model_final.pth has {len(bad)} non-finite tensors")
    check(trainer.nonfinite_steps == 1, f"nonfinite_steps = {trainer.nonfinite_steps}")
    return f"finite loss, NaN gradient: step skipped and counted, model_final.pth finite; {line}"


def nonfinite_model_not_saved(workdir):
    import torch
    from detectron2.engine import HookBase

    class Poison(HookBase):  # after iteration 1's checkpoint, a weight becomes NaN
        def after_step(self):
            if self.trainer.iter == 1:
                with torch.no_grad():
                    next(self.trainer.model.parameters()).view(-1)[0] = float("nan")

    trainer = tiny_trainer(workdir, "out", 4, 1)
    trainer.register_hooks([Poison()])
    out = trainer.cfg.OUTPUT_DIR
    detail = expect_error(trainer.train, names=[os.path.join(out, "model_0000002.pth"), "non-finite"])
    check(_last(out) == "model_0000001.pth", f"last_checkpoint says {_last(out)!r}")
    check(not os.path.exists(os.path.join(out, "model_0000002.pth")), "the NaN model was written")
    _load(os.path.join(out, "model_0000001.pth"))
    return detail + "; last_checkpoint still model_0000001.pth"


# --- (4) full disk while saving ---------------------------------------------------------------------


def disk_full_on_checkpoint(workdir):
    import torch

    trainer = tiny_trainer(workdir, "out", 3, 1)
    out = trainer.cfg.OUTPUT_DIR
    real_save = torch.save
    torch.save = _aborting_torch_save(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), after_calls=1)
    try:
        detail = expect_error(trainer.train, names=[os.path.join(out, "model_0000001.pth"),
                                                    "No space left on device"], exc=(OSError,))
    finally:
        torch.save = real_save
    check(_last(out) == "model_0000000.pth", f"last_checkpoint says {_last(out)!r}")
    torn = [f for f in os.listdir(out) if f.endswith(".tmp") or f == "model_0000001.pth"]
    check(not torn, f"partial files left on the full disk: {torn}")
    _load(os.path.join(out, "model_0000000.pth"))
    return detail


CASES = [
    Case("training", "sigkill_mid_run_then_resume", sigkill_then_resume, slow=True),
    Case("training", "sigterm_checkpoints_then_resume", sigterm_then_resume, slow=True),
    Case("training", "abort_while_saving_checkpoint", abort_while_saving),
    Case("training", "hard_kill_while_saving_checkpoint", hard_kill_while_saving, slow=True),
    Case("training", "nonfinite_loss_step_skipped", nonfinite_loss_skipped),
    Case("training", "nonfinite_losses_in_a_row_stop", nonfinite_losses_in_a_row_stop),
    Case("training", "disk_full_on_checkpoint", disk_full_on_checkpoint),
    Case("training", "nonfinite_gradient_of_finite_loss_skipped", nonfinite_gradient_step_skipped),
    Case("training", "nonfinite_model_never_saved", nonfinite_model_not_saved),
]
