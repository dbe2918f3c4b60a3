"""Detector runs of the DiffusionEngine demo job (:mod:`diffusionengine.main_job`): train a config
(resuming from its OUTPUT_DIR) and evaluate it for every (sampling steps, boxes) pair with the
main job's own code (diffusiondet/tooling/main_job.py, shared with `make demo`), so the rows
compare with its table.
"""
import time
from typing import Dict, List, Sequence

from diffusiondet.tooling import main_job

from .config import build_config

__all__ = ["evaluate", "scaled_schedule", "train", "train_and_evaluate"]


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
    resumes from its last checkpoint to the same weights (the Trainer is seeded by SEED); no
    end-of-training evaluation (every row is evaluated by :func:`evaluate`)."""
    cfg = build_config(config_file, list(opts))
    cfg.freeze()
    return main_job.train(cfg)


def evaluate(config_file: str, opts: Sequence, weights: str, steps: int, boxes: int) -> Dict:
    """Box AP of ``weights`` on DATASETS.TEST[0] with ``steps`` sampling steps and ``boxes``
    boxes: {"steps", "boxes", "AP", "AP50", "AP75", "seconds"}."""
    row, seconds = main_job.evaluate(build_config(config_file, list(opts), steps=steps, boxes=boxes), weights)
    return {**row, "seconds": seconds}


def train_and_evaluate(config_file: str, opts: Sequence, steps: Sequence[int], boxes: Sequence[int]) -> Dict:
    """:func:`train`, then :func:`evaluate` for every (steps, boxes): {"weights", "rows",
    "train_seconds"}."""
    start = time.perf_counter()
    weights = train(config_file, opts)
    seconds = time.perf_counter() - start
    rows = [evaluate(config_file, opts, weights, s, b) for s in steps for b in boxes]
    return {"weights": weights, "rows": rows, "train_seconds": seconds}
