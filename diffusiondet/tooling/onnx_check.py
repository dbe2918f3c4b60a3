"""What ``tools/export_onnx.py`` measures about an exported detector: its AP on a registered dataset
and its images/s against the PyTorch model, each predictor called like the model
(``predict(batched_inputs) -> [{"instances": Instances}]``).
"""
import itertools
import logging
from typing import Callable, Dict, List, Optional

import torch
from detectron2.utils.logger import create_small_table

from ..engine import Trainer
from .bench_timing import measure

__all__ = ["benchmark_inputs", "evaluate_predictor", "images_per_second"]

logger = logging.getLogger(__name__)

Predict = Callable[[List[Dict]], List[Dict]]


def evaluate_predictor(
    cfg, predict: Predict, dataset: str, output_dir: str, max_images: int = 0
) -> Dict[str, Dict[str, float]]:
    """The dataset's evaluation (the evaluator the Trainer builds for it: COCO, LVIS, CrowdHuman)
    of ``predict`` over the test loader of ``dataset``.

    Args:
        max_images: evaluate the first images only (at least this many: whole loader batches), and
            only on them (``img_ids``; COCO / LVIS evaluators); 0 = every image.
    """
    loader = Trainer.build_test_loader(cfg, dataset)
    evaluator = Trainer.build_evaluator(cfg, dataset, output_dir)
    evaluator.reset()
    seen = []
    with torch.no_grad():
        for inputs in loader:
            if max_images and len(seen) >= max_images:
                break
            evaluator.process(inputs, predict(inputs))
            seen += [x["image_id"] for x in inputs]
    results = evaluator.evaluate(img_ids=seen) if max_images else evaluator.evaluate()
    for task, metrics in (results or {}).items():
        logger.info("%s on %d images of %s:\n%s", task, len(seen), dataset, create_small_table(metrics))
    return dict(results or {})


def benchmark_inputs(cfg, dataset: Optional[str], count: int, height: int, width: int) -> List[Dict]:
    """``count`` test inputs: the first images of ``dataset`` through its test mapper, or (None)
    random RGB images of ``height`` × ``width``."""
    if dataset is None:
        generator = torch.Generator().manual_seed(0)
        return [
            {"image": torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8),
             "height": height, "width": width, "image_id": index}
            for index in range(count)
        ]  # fmt: skip
    loader = Trainer.build_test_loader(cfg, dataset)
    return list(itertools.islice((x for batch in loader for x in batch), count))


def images_per_second(predict: Predict, inputs: List[Dict], repeats: int) -> float:
    """Images per second of ``predict(inputs)`` (two untimed warm-up calls, then ``repeats``
    calls timed together, torch's thread count; see ``bench_timing.measure``)."""
    with torch.no_grad():
        seconds = measure(lambda: predict(inputs), torch.device("cpu"), repeats).mean
    return len(inputs) / seconds
