"""The two pictures of the main job (tools/run_main_job.py, `make demo`), written beside its
ap_table.json:

* ``predictions.png``: the first validation images with the detections of the table's best
  (steps, boxes) row (highest box AP), drawn by detectron2's Visualizer (class names from the
  dataset's MetadataCatalog entry, masks too for DiffusionInst), detections scoring at least
  :data:`SCORE_THRESHOLD` (the value is in the figure's title);
* ``ap_vs_steps_boxes.png``: box AP against sampling steps, one line per boxes value, with a
  mean ± std band when the rows hold one AP per seed.

The detections are those the evaluation scored: the trained model runs on the images in the
evaluation's batches (the same test loader) with the evaluation's noise, drawn per image from
(SEED, image id). Both pictures are rendered with matplotlib's Agg canvas (no display, no global
backend switch); the same inputs give the same PNG bytes with the same library versions.
"""
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image

from ..engine import Trainer, load_model_weights
from ..utils.rng_state import preserved_rng_state, seeded_rngs
from .demo import draw_predictions
from .main_job import steps_and_boxes  # the (steps, boxes) reading of the table's rows

__all__ = ["SCORE_THRESHOLD", "ap_figure", "ap_series", "best_row", "predict_first_images", "predictions_figure",
           "write_ap_figure", "write_predictions_figure"]

# Detections below this score are not drawn. At the main job's 100-300 boxes most boxes are
# low-scoring background guesses; 0.3 keeps the objects the model finds with some confidence
# (the score threshold the DiffusionEngine paper uses to label generated images, too).
SCORE_THRESHOLD = 0.3
# Small images are drawn enlarged (nearest neighbour) to this shorter side, so that the
# Visualizer's labels stay legible: the synthetic set's 160 px images become 320 px tiles.
DRAW_MIN_SIZE = 320
_DPI = 100


def _mean(value) -> float:
    return statistics.mean(value) if isinstance(value, list) else float(value)


def best_row(rows: Sequence[Dict]) -> Dict:
    """The row with the highest box AP (the mean AP where a row holds one per seed); the first
    in table order on a tie, so the choice is deterministic."""
    return max(rows, key=lambda r: _mean(r["AP"]))  # max keeps the first of equal keys


def predict_first_images(cfg, model, num_images: int) -> List[Tuple[Dict, object]]:
    """[(dataset record, CPU Instances)] of the first ``num_images`` images of DATASETS.TEST[0],
    predicted by ``model`` (eval mode, no gradients) from the batches of the evaluation's test
    loader, so every image gets the padding and the (SEED, image id) noise of the evaluation.
    Global random generators are left as they were (as Trainer.test does)."""
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    found = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), preserved_rng_state():
            for batch in loader:
                outputs = model(batch)
                found += [(inputs, out["instances"].to("cpu")) for inputs, out in zip(batch, outputs)]
                if len(found) >= num_images:
                    break
    finally:
        model.train(was_training)
    return found[:num_images]


def predictions_figure(items, metadata, title: str, score_threshold: float = SCORE_THRESHOLD,
                       cols: int = 3, draw_min_size: int = DRAW_MIN_SIZE) -> Figure:
    """A grid of the images of ``items`` ([(record with "file_name" and "image_id", Instances)]),
    ``cols`` per row, each with its detections scoring >= ``score_threshold`` drawn by
    detectron2's Visualizer, and ``title`` above."""
    tiles = []
    for record, instances in items:
        image = read_image(record["file_name"], format="RGB")
        kept = instances[instances.scores >= score_threshold]
        # Visualizer draws a random colour per instance from numpy's global generator when the
        # dataset has no thing_colors: seeded by the image, the picture is the same every run.
        with seeded_rngs(int(record["image_id"])):
            drawn = draw_predictions(image, kept, metadata, draw_min_size)
        tiles.append((record["image_id"], len(kept), drawn))
    rows = -(-len(tiles) // cols)
    tile_h = max(t[2].shape[0] for t in tiles)
    tile_w = max(t[2].shape[1] for t in tiles)
    # Tiles at about their own pixel size, plus room for the captions and the title.
    fig = Figure(figsize=(cols * tile_w / _DPI + 0.4, rows * (tile_h / _DPI + 0.35) + 0.6), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, (image_id, count, drawn) in zip(axes, tiles):
        ax.imshow(drawn, interpolation="nearest")
        ax.set_title(f"image {image_id}: {count} detection{'s' * (count != 1)}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_predictions_figure(cfg, weights: str, path: str, num_images: int = 6, cols: int = 3,
                             score_threshold: float = SCORE_THRESHOLD, ap: Optional[float] = None) -> Dict:
    """Run ``weights`` with ``cfg`` (built at the chosen steps and boxes) on the first ``num_images``
    images of DATASETS.TEST[0] and write :func:`predictions_figure` to ``path``; ``ap``: the row's
    box AP, for the title. Returns {"title", "images": [{"image_id", "detections"}]} (the
    detections drawn on each image)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    model = Trainer.build_model(cfg)
    load_model_weights(model, cfg)  # the checks of every tool that runs a trained model
    items = predict_first_images(cfg, model, num_images)
    dataset = cfg.DATASETS.TEST[0]
    steps, boxes = steps_and_boxes(cfg)
    score = "" if ap is None else f", box AP {ap:.1f}"
    title = (f"{cfg.MODEL.META_ARCHITECTURE} on {dataset}: {steps} step{'s' * (steps != 1)}, {boxes} boxes"
             f"{score}; detections with score \u2265 {score_threshold:g}")
    fig = predictions_figure(items, MetadataCatalog.get(dataset), title, score_threshold, cols)
    fig.savefig(path, dpi=_DPI)
    drawn = [{"image_id": r["image_id"], "detections": int((i.scores >= score_threshold).sum())} for r, i in items]
    return {"title": title, "images": drawn}


def ap_series(rows: Sequence[Dict], metric: str = "AP") -> Dict[int, Dict[str, List[float]]]:
    """boxes -> {"steps", "mean", "std"}, sorted by steps: the curve of each boxes value. A metric
    that is a list (one value per seed) gives its mean and sample std (as the table's cells), a
    single value a std of 0."""
    series: Dict[int, Dict[str, List[float]]] = {}
    for r in sorted(rows, key=lambda r: (r["boxes"], r["steps"])):
        value = r[metric]
        values = value if isinstance(value, list) else [value]
        s = series.setdefault(r["boxes"], {"steps": [], "mean": [], "std": []})
        s["steps"].append(r["steps"])
        s["mean"].append(statistics.mean(values))
        s["std"].append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return series


def ap_figure(rows: Sequence[Dict], title: str, metric: str = "AP") -> Figure:
    """``metric`` against sampling steps, one line per boxes value; a shaded mean ± std band
    where the rows hold several seeds."""
    series = ap_series(rows, metric)
    fig = Figure(figsize=(6.0, 4.0), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for boxes, s in series.items():
        (line,) = ax.plot(s["steps"], s["mean"], marker="o", label=f"{boxes} boxes")
        if any(s["std"]):
            low = [m - d for m, d in zip(s["mean"], s["std"])]
            high = [m + d for m, d in zip(s["mean"], s["std"])]
            ax.fill_between(s["steps"], low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xticks(sorted({x for s in series.values() for x in s["steps"]}))
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"box {metric}" if not metric.startswith("mask") else metric)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_ap_figure(rows: Sequence[Dict], path: str, title: str, metric: str = "AP") -> None:
    """:func:`ap_figure` written to ``path`` (PNG)."""
    ap_figure(rows, title, metric).savefig(path, dpi=_DPI)
