"""Training and (steps, boxes) evaluation of the main job (`make demo`, tools/run_main_job.py),
shared with the detector runs of the DiffusionEngine demo job (diffusionengine/job_detectors.py)
so that both tables come from the same code.

The callers build the configs (tooling never imports diffusioninst or diffusionengine) and pass
them in: :func:`train` takes the training config, :func:`evaluate` one config per (steps, boxes).
"""
import logging
import os
import statistics
import time
from typing import Dict, List, Sequence, Tuple

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..data.datasets import datasets_root
from ..engine import Trainer, load_model_weights
from ..utils.progress import progress_bar

__all__ = ["METRICS", "MainJobTrainer", "TrainingProgress", "data_selection", "evaluate", "format_table",
           "merge_seed_rows", "steps_and_boxes", "train"]

logger = logging.getLogger(__name__)

# The metrics of a table row, in column order; the mask ones only for a MASK_ON model.
METRICS = ("AP", "AP50", "AP75", "mask AP", "mask AP50")


class TrainingProgress(HookBase):
    """A bar over the training iterations with rate and ETA (main process only: the other ranks
    would draw the same bar again). detectron2's periodic log lines stay as they are."""

    def __init__(self, enabled=None):
        self._enabled = enabled
        self.bar = None

    def before_train(self):
        self.bar = progress_bar(total=self.trainer.max_iter, initial=self.trainer.start_iter, desc="training",
                                unit="iter", enabled=self._enabled)

    def after_step(self):
        self.bar.update(1)

    def after_train(self):
        if self.bar is not None:
            self.bar.close()


class _ImageProgress:
    """The test loader, counted per image on a bar while the evaluation iterates it; ``len`` stays
    the loader's (detectron2's inference_on_dataset needs it)."""

    def __init__(self, loader, desc):
        self.loader, self.desc = loader, desc

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        dataset = getattr(self.loader, "dataset", None)
        total = len(dataset) if hasattr(dataset, "__len__") else None
        with progress_bar(total=total, desc=self.desc, unit="img", leave=False,
                          enabled=None if comm.is_main_process() else False) as bar:
            for batch in self.loader:
                yield batch
                bar.update(len(batch))


class MainJobTrainer(Trainer):
    """The project's Trainer without detectron2's end-of-training evaluation, and with bars.

    Its EvalHook evaluates once after the last iteration even with TEST.EVAL_PERIOD 0, at the
    config's own (steps, boxes); every row of the main job's tables is evaluated explicitly by
    :func:`evaluate` instead, so that evaluation was computed and thrown away (on the synthetic
    main job, as long as one row of the table)."""

    def build_hooks(self):
        hook_list = [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]
        if comm.is_main_process():
            hook_list.append(TrainingProgress())
        return hook_list

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = super().build_test_loader(cfg, dataset_name)
        return _ImageProgress(loader, "eval {} steps, {} boxes".format(*steps_and_boxes(cfg)))


def train(cfg) -> str:
    """Train (or finish training) ``cfg`` in its OUTPUT_DIR, resuming from its last checkpoint
    (a killed run resumes to the same weights: the Trainer is seeded by SEED); returns
    OUTPUT_DIR/model_final.pth."""
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    trainer = MainJobTrainer(cfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter < cfg.SOLVER.MAX_ITER:
        trainer.train()
    else:
        logger.info("Training already finished in %s; evaluating only", cfg.OUTPUT_DIR)
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def evaluate(cfg, weights: str) -> Tuple[Dict, float]:
    """AP of ``weights`` on DATASETS.TEST[0] with the (steps, boxes) of ``cfg`` (its SAMPLE_STEP and
    EVAL_NUM_PROPOSALS): ({"steps", "boxes", "AP", "AP50", "AP75"[, "mask AP", "mask AP50"]},
    seconds). The sampling noise of each image comes from (SEED, image id), so the row does not
    depend on the batch size or on the rows evaluated before it."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = MainJobTrainer.build_model(cfg)
    load_model_weights(model, cfg)  # safe unpickling, architecture, shapes, finite values
    start = time.perf_counter()
    results = MainJobTrainer.test(cfg, model)
    elapsed = time.perf_counter() - start
    results = results if "bbox" in results else next(iter(results.values()))
    bbox = results["bbox"]
    steps, boxes = steps_and_boxes(cfg)
    row = {"steps": steps, "boxes": boxes, "AP": bbox["AP"], "AP50": bbox["AP50"], "AP75": bbox["AP75"]}
    if "segm" in results:
        row.update({"mask AP": results["segm"]["AP"], "mask AP50": results["segm"]["AP50"]})
    return row, elapsed


def data_selection(num_images):
    """The synthetic data to use: (root, {name: (split, count)}, config overrides selecting it);
    (None, None, []) for the built-in 600 / 100 images. ``num_images`` = (TRAIN, VAL) selects the
    first TRAIN / VAL images, generated under $DETECTRON2_DATASETS/synthetic_crowd_TRAIN_VAL and
    registered as synthetic_crowd_{train_TRAIN,val_VAL}."""
    if num_images is None:
        return None, None, []
    num_train, num_val = num_images
    train, val = f"synthetic_crowd_train_{num_train}", f"synthetic_crowd_val_{num_val}"
    splits = {train: ("train", num_train), val: ("val", num_val)}
    root = os.path.join(datasets_root(), f"synthetic_crowd_{num_train}_{num_val}")
    return root, splits, ["DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,)]


def steps_and_boxes(cfg) -> Tuple[int, int]:
    """(sampling steps, boxes) of an evaluation with ``cfg`` (EVAL_NUM_PROPOSALS 0: NUM_PROPOSALS)."""
    d = cfg.MODEL.DiffusionDet
    return d.SAMPLE_STEP, d.EVAL_NUM_PROPOSALS or d.NUM_PROPOSALS


def merge_seed_rows(per_seed: Sequence[Sequence[Dict]]) -> List[Dict]:
    """The tables of several seeds (same rows, same order) as one whose metrics are per-seed lists."""
    return [{**first, **{m: [rows[i][m] for rows in per_seed] for m in METRICS if m in first}}
            for i, first in enumerate(per_seed[0])]


def format_table(rows: Sequence[Dict]) -> str:
    """Markdown AP table; a cell is "x.x", or "mean ± std" where a row holds per-seed lists."""
    metrics = [m for m in METRICS if m in rows[0]]
    lines = ["| steps | boxes | " + " | ".join(metrics) + " |", "|---:" * (2 + len(metrics)) + "|"]
    for r in rows:
        cells = [_cell(r[m]) for m in metrics]
        lines.append(f"| {r['steps']} | {r['boxes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value):
    if isinstance(value, list):
        spread = statistics.stdev(value) if len(value) > 1 else 0.0
        return f"{statistics.mean(value):.1f} ± {spread:.1f}"
    return f"{value:.1f}"
