"""SIGTERM, what schedulers send before they kill a job: training writes a checkpoint at an
iteration every rank agrees on and exits with 128 + 15, and ``--resume`` then ends with the
weights of an uninterrupted run (1 and 2 GLOO processes, the signal sent to the launcher);
a stand-alone evaluation says that its results are lost."""
import logging
import os
import signal

import pytest
import torch

from diffusiondet.engine import Trainer
from diffusiondet.engine.stop_signal import EvaluationStopped, StopOnSignal, stop_signals_abort
from tests.engine.test_exact_resume import _cfg, _equal, _job


# Bit-equal resume must hold under any CPU's kernels: the one-process case is re-run under the
# AVX2 one-thread settings (the two-process one only in the full suite, for time).
@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.numerics), 2])
def test_sigterm_checkpoints_exits_143_and_resume_equals_the_uninterrupted_run(tiny_data, straight_run, tmp_path, world):
    # SIGTERM after iteration 1: every rank stops after iteration 2, which is not a periodic
    # checkpoint (those follow iterations 1, 3 and 5): the file must come from the stop.
    stopped = _job(tmp_path, tiny_data, "stopped", world, "-m", "tests.engine.killed_training", "--term-after", "1")
    log = stopped.stderr + stopped.stdout
    assert stopped.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    out = tmp_path / "stopped"
    assert (out / "last_checkpoint").read_text() == "model_0000002.pth"
    assert "training stopped after iteration 2 of 6" in log
    assert not (out / "model_final.pth").exists()
    state = torch.load(out / "model_0000002.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["data_position"] == 3 and len(state["rng_states"]) == world
    resumed = _job(tmp_path, tiny_data, "stopped", world, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Starting training from iteration 3" in resumed.stderr + resumed.stdout
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert _equal(final, straight_run(world))


def test_standalone_evaluation_stopped_by_sigterm_says_its_results_are_lost(caplog):
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="diffusiondet"), pytest.raises(EvaluationStopped) as stop:
        with stop_signals_abort("the evaluation on ('val',)"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)  # a bytecode boundary for the handler, not a sleep race
            pytest.fail("SIGTERM did not stop the evaluation")
    assert stop.value.code == 128 + signal.SIGTERM
    assert "the evaluation on ('val',) stopped before it finished; no results were written" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_evaluation_inside_training_keeps_the_trainings_handler(tiny_data, tmp_path):
    """During training the signal is only recorded: the evaluation in progress completes and the
    run stops after it, with a checkpoint (not in the middle of it with nothing saved)."""
    trainer = Trainer(_cfg(tmp_path))
    hook = next(h for h in trainer._hooks if isinstance(h, StopOnSignal))
    hook.before_train()
    try:
        with stop_signals_abort("an evaluation"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.5)
        assert hook.received == signal.SIGTERM
    finally:
        hook.after_train()
