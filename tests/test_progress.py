"""Progress bars of the main job: the helper (diffusiondet/utils/progress.py: counts, off when
the stream is not a terminal, DIFFUSIONDET_PROGRESS), and the main job's trainer
(diffusiondet/tooling/main_job.py): a bar over the iterations and over the evaluated images, and
no end-of-training evaluation.
"""
import io
import os
import re
import types

import pytest
from detectron2.engine import hooks

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd
from diffusiondet.tooling import main_job
from diffusiondet.utils.progress import PROGRESS_ENV, progress_bar, progress_enabled
from tests.utils import tiny_cfg


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)


def test_a_bar_counts_and_shows_total_rate_and_eta_on_a_terminal():
    out = _Terminal()
    with progress_bar(total=7, desc="work", unit="img", file=out) as bar:
        for _ in range(5):
            bar.update(1)
        assert bar.n == 5
    text = out.getvalue()
    assert "work" in text and "5/7" in text and "img" in text
    assert "<" in text  # elapsed<remaining: the ETA
    out = _Terminal()
    assert list(progress_bar(range(4), file=out, initial=0)) == [0, 1, 2, 3] and "4/4" in out.getvalue()


def test_no_bar_when_the_stream_is_not_a_terminal_unless_forced(monkeypatch):
    log = io.StringIO()  # a log file or pipe
    assert list(progress_bar(range(3), desc="quiet", file=log)) == [0, 1, 2]
    assert log.getvalue() == ""
    monkeypatch.setenv(PROGRESS_ENV, "1")  # forced, e.g. under `| tee`
    list(progress_bar(range(3), desc="forced", file=log))
    assert "forced" in log.getvalue() and "3/3" in log.getvalue()
    monkeypatch.setenv(PROGRESS_ENV, "0")  # hidden on a terminal too
    term = _Terminal()
    list(progress_bar(range(3), file=term))
    assert term.getvalue() == ""
    # An explicit argument wins over the variable.
    list(progress_bar(range(2), desc="explicit", file=term, enabled=True))
    assert "explicit" in term.getvalue()


@pytest.mark.parametrize("value, expected", [("1", True), ("on", True), ("0", False), ("off", False), ("", None),
                                             ("maybe", None)])
def test_progress_enabled_reads_the_variable(monkeypatch, value, expected):
    monkeypatch.setenv(PROGRESS_ENV, value)
    assert progress_enabled() is expected
    assert progress_enabled(False) is False


def test_training_hook_counts_from_the_resumed_iteration_to_max_iter(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    hook = main_job.TrainingProgress()
    hook.trainer = types.SimpleNamespace(max_iter=10, start_iter=4)
    hook.before_train()
    for _ in range(6):
        hook.after_step()
    assert hook.bar.n == 10
    hook.after_train()
    assert "training" in capsys.readouterr().err and "10/10" in hook.bar.__str__()


class _Loader:
    """5 images in batches of 2, like a detectron2 test loader (len = batches, .dataset = images)."""

    dataset = list(range(5))

    def __len__(self):
        return 3

    def __iter__(self):
        return iter([[0, 1], [2, 3], [4]])


def test_image_progress_counts_images_and_keeps_the_loaders_length(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    wrapped = main_job._ImageProgress(_Loader(), "eval")
    assert len(wrapped) == 3  # detectron2's inference_on_dataset counts batches
    counts = []
    original = main_job.progress_bar

    def spy(**kwargs):
        bar = original(**kwargs)
        counts.append(bar)
        return bar

    monkeypatch.setattr(main_job, "progress_bar", spy)
    assert list(wrapped) == [[0, 1], [2, 3], [4]]
    assert counts[0].total == 5 and counts[0].n == 5


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("progress_data"))
    json_file = generate_synthetic_crowd(root, split="train", num_images=2, image_size=(64, 88), min_objects=2,
                                         max_objects=4, seed=9)
    register_coco_json("progress_tiny_train", json_file, os.path.join(root, "train"),
                       metadata={"thing_classes": list(SYNTHETIC_CROWD_CLASSES)})
    return "progress_tiny_train"


def test_main_job_training_shows_its_bar_and_skips_the_unused_final_evaluation(train_set, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    cfg = tiny_cfg("MODEL.DiffusionDet.NUM_CLASSES", 5, "DATASETS.TRAIN", (train_set,), "DATASETS.TEST", (train_set,),
                   "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100, "OUTPUT_DIR", str(tmp_path))
    cfg.freeze()
    # detectron2's EvalHook evaluates after the last iteration even with TEST.EVAL_PERIOD 0 (the
    # tiny config's): the main job's trainer must not have it.
    trainer = main_job.MainJobTrainer(cfg)
    assert not [h for h in trainer._hooks if isinstance(h, hooks.EvalHook)]
    assert [h for h in trainer._hooks if isinstance(h, main_job.TrainingProgress)]
    del trainer
    weights = main_job.train(cfg)
    assert weights == os.path.join(str(tmp_path), "model_final.pth") and os.path.isfile(weights)
    assert not os.path.exists(tmp_path / "inference")  # no evaluation ran
    assert "2/2" in capsys.readouterr().err
    # A finished run only reports so: no second training, no bar.
    # (Match the bar itself: in the full suite, stderr may also carry a "--- Logging error ---"
    # report of another test's handler, whose traceback names this test, "training" included.)
    assert main_job.train(cfg) == weights and not re.search(r"training: +\d+%", capsys.readouterr().err)


def test_steps_and_boxes_reads_zero_boxes_as_the_training_proposals():
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLE_STEP", 3, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 0)
    assert main_job.steps_and_boxes(cfg) == (3, 20)  # TINY_OPTS' NUM_PROPOSALS
    assert main_job.steps_and_boxes(tiny_cfg("MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 7))[1] == 7


def test_synthetic_data_generation_shows_a_bar_per_image(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    generate_synthetic_crowd(str(tmp_path), split="val", num_images=3, image_size=(40, 56), seed=1)
    err = capsys.readouterr().err
    assert "synthetic val" in err and "3/3" in err
    # Reused, not generated again: no bar.
    generate_synthetic_crowd(str(tmp_path), split="val", num_images=3, image_size=(40, 56), seed=1)
    assert "synthetic" not in capsys.readouterr().err
