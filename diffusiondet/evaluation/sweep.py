"""The flexibility sweep: one model evaluated at every (steps, boxes, seed), backbone once per image.

The same weights work with any number of boxes and steps; the sweep measures how the metric moves
with both, and how much it depends on the sampling noise (seeds). Backbone features are computed
once per image and reused by every combination (the backbone is most of the cost of a 1-step
evaluation). Finished combinations are stored in ``<output_dir>/sweep_results.json`` and not
recomputed, so a killed sweep resumes where it stopped (at the granularity of ``group_size``).
"""
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence

from ..diffusion import TorchRandom, seeded_source
from ..utils.progress import progress_bar

__all__ = ["Combination", "combinations", "image_rng", "primary_metric", "run_sweep"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Combination:
    steps: int
    boxes: int
    seed: int

    @property
    def key(self) -> str:
        return f"steps{self.steps}_boxes{self.boxes}_seed{self.seed}"


def combinations(steps: Iterable[int], boxes: Iterable[int], seeds: Iterable[int]) -> List[Combination]:
    return [Combination(s, n, r) for s in steps for n in boxes for r in seeds]


def image_rng(seed: int, image_id) -> TorchRandom:
    """The noise source of one image under ``seed``: independent of batch size and image order
    (the one the model uses by itself at evaluation under ``SEED``)."""
    return seeded_source(seed, image_id)


def primary_metric(results: Dict[str, Dict[str, float]]) -> str:
    """``task/metric`` to tabulate: COCO / LVIS "bbox/AP", CrowdHuman "crowdhuman/AP50"."""
    for task, metrics in results.items():
        for name in ("AP", "AP50"):
            if name in metrics:
                return f"{task}/{name}"
    task = next(iter(results))
    return f"{task}/{next(iter(results[task]))}"


def _save(done: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(done, f, indent=1)
    os.replace(tmp, path)


def run_sweep(
    model,
    data_loader: Iterable[List[dict]],
    evaluator_factory: Callable[[Combination], object],
    todo: Sequence[Combination],
    output_dir: str,
    group_size: int = 0,
    progress: bool = True,
) -> Dict[str, dict]:
    """Evaluate ``model`` for every combination not yet in ``sweep_results.json``.

    Args:
        model: a DiffusionDet in eval mode (``inference_features`` / ``sample_detections``).
        data_loader: detectron2 test loader (lists of input dicts with "image_id").
        evaluator_factory: a fresh DatasetEvaluator for one combination.
        todo: the combinations wanted.
        output_dir: where ``sweep_results.json`` lives.
        group_size: combinations evaluated per pass over the data (0 = all in one pass); smaller
            groups save results more often at the price of recomputing the backbone per group.
        progress: a bar per pass (diffusiondet.utils.progress: on a terminal, or as
            DIFFUSIONDET_PROGRESS says); False hides it.

    Returns:
        {combination key: {"steps", "boxes", "seed", "results", "seconds"}} for every finished
        combination (also those of earlier runs). ``seconds`` holds the backbone time of the pass
        (shared by its group) and the combination's own sampling time.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "sweep_results.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    pending = [c for c in todo if c.key not in done]
    saved = (model.sampler.steps, model.eval_num_proposals)
    size = group_size or max(len(pending), 1)
    try:
        for start in range(0, len(pending), size):
            group = pending[start : start + size]
            evaluators = {c: evaluator_factory(c) for c in group}
            for evaluator in evaluators.values():
                evaluator.reset()
            backbone_s, sampling_s = 0.0, {c: 0.0 for c in group}
            for inputs in progress_bar(data_loader, desc=f"sweep {start + len(group)}/{len(pending)}",
                                       enabled=None if progress else False):  # fmt: skip
                tick = time.perf_counter()
                images, whwh, features = model.inference_features(inputs)
                backbone_s += time.perf_counter() - tick
                for c in group:
                    tick = time.perf_counter()
                    model.sampler.steps, model.eval_num_proposals = c.steps, c.boxes
                    rngs = [image_rng(c.seed, x["image_id"]) for x in inputs]
                    outputs = model.sample_detections(inputs, images, whwh, features, per_image_rng=rngs)
                    sampling_s[c] += time.perf_counter() - tick
                    evaluators[c].process(inputs, outputs)
            for c, evaluator in evaluators.items():
                results = {task: dict(metrics) for task, metrics in evaluator.evaluate().items()}
                seconds = {"backbone_shared": backbone_s, "sampling": sampling_s[c]}
                done[c.key] = {"steps": c.steps, "boxes": c.boxes, "seed": c.seed,
                               "results": results, "seconds": seconds}  # fmt: skip
            _save(done, path)
            logger.info(
                "%d runs: backbone %.1f s once (%.1f s if every run recomputed it), sampling %.1f s",
                len(group), backbone_s, backbone_s * len(group), sum(sampling_s.values()),
            )
    finally:
        model.sampler.steps, model.eval_num_proposals = saved
    return done
