"""Detector runs of the DiffusionEngine demo job (:mod:`diffusionengine.main_job`): train a config
(resuming from its OUTPUT_DIR) and evaluate it for every (sampling steps, boxes) pair, as the main
job (`make demo`, tools/run_main_job.py) does, so the rows compare with its table.
"""
import logging
import os
import time
from typing import Dict, List, Sequence

from detectron2.engine import hooks

from diffusiondet.engine import Trainer, load_model_weights

from .config import build_config

__all__ = ["evaluate", "scaled_schedule", "train", "train_and_evaluate"]

logger = logging.getLogger(__name__)


class _TrainOnly(Trainer):
    """The project's Trainer without detectron2's end-of-training evaluation: every row of the
    job's tables is evaluated explicitly, at its own (steps, boxes)."""

    def build_hooks(self):
        return [h for h in super().build_hooks() if not isinstance(h, hooks.EvalHook)]


def scaled_schedule(config_file: str, max_iter: int) -> List:
    """Opts that run the config's schedule in ``max_iter`` iterations: SOLVER.STEPS, warm-up
    and checkpoint period scaled by max_iter / SOLVER.MAX_ITER (a shortened run keeps the shape
    of the recipe's learning-rate curve)."""
    cfg = build_config(config_file)
    scale = max_iter / cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, round(s * scale)) for s in cfg.SOLVER.STEPS if round(s * scale) < max_iter)
    return ["SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", steps,
            "SOLVER.WARMUP_ITERS", max(1, round(cfg.SOLVER.WARMUP_ITERS * scale)),
            "SOLVER.CHECKPOINT_PERIOD", max(1, min(cfg.SOLVER.CHECKPOINT_PERIOD, max_iter))]


def train(config_file: str, opts: Sequence) -> str:
    """Train (or finish training) the config; returns OUTPUT_DIR/model_final.pth. A killed run
    resumes from its last checkpoint to the same weights (the Trainer is seeded by SEED)."""
    cfg = build_config(config_file, list(opts))
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    cfg.freeze()
    trainer = _TrainOnly(cfg)
    trainer.resume_or_load(resume=True)
    if trainer.start_iter < cfg.SOLVER.MAX_ITER:
        trainer.train()
    else:
        logger.info("Training already finished in %s", cfg.OUTPUT_DIR)
    return os.path.join(cfg.OUTPUT_DIR, "model_final.pth")


def evaluate(config_file: str, opts: Sequence, weights: str, steps: int, boxes: int) -> Dict:
    """Box AP of ``weights`` on DATASETS.TEST[0] with ``steps`` sampling steps and ``boxes``
    boxes: {"steps", "boxes", "AP", "AP50", "AP75", "seconds"}."""
    cfg = build_config(config_file, list(opts), steps=steps, boxes=boxes)
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = Trainer.build_model(cfg)
    load_model_weights(model, cfg)  # safe loading, architecture and finite values checked
    start = time.perf_counter()
    results = Trainer.test(cfg, model)
    bbox = (results if "bbox" in results else next(iter(results.values())))["bbox"]
    return {"steps": steps, "boxes": boxes, "AP": bbox["AP"], "AP50": bbox["AP50"], "AP75": bbox["AP75"],
            "seconds": time.perf_counter() - start}


def train_and_evaluate(config_file: str, opts: Sequence, steps: Sequence[int], boxes: Sequence[int]) -> Dict:
    """:func:`train`, then :func:`evaluate` for every (steps, boxes): {"weights", "rows",
    "train_seconds"}."""
    start = time.perf_counter()
    weights = train(config_file, opts)
    seconds = time.perf_counter() - start
    rows = [evaluate(config_file, opts, weights, s, b) for s in steps for b in boxes]
    return {"weights": weights, "rows": rows, "train_seconds": seconds}
