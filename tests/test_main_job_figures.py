"""The main job's pictures (diffusiondet/tooling/main_job_figures.py): predictions.png from a
tiny random model on non-square synthetic images, the detections being exactly those the
evaluation scored, and ap_vs_steps_boxes.png from hand-made tables.

Shape legend: H×W = 96×128 (wide) and W×H (tall) images, S = 4 the factor the images are drawn
enlarged by (shorter side 96 -> >= 320 pixels); tiles are (S*H, S*W, 3) uint8 RGB.
"""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances
from matplotlib.collections import PolyCollection

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd
from diffusiondet.engine import Trainer
from diffusiondet.tooling import main_job
from diffusiondet.tooling.main_job_figures import (ap_figure, ap_series, best_row, predict_first_images,
                                                   predictions_figure, write_ap_figure, write_predictions_figure)
from tests.utils import tiny_cfg

DATASET = "main_job_figures_val"
H, W, S = 96, 128, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 images, wide (H×W) and tall (W×H) in turn: an evaluation batch of 2 pads both to one size,
    so an image predicted in another batch would get other features (GroupNorm sees the padding)."""
    root = str(tmp_path_factory.mktemp("figures_data"))
    parts = []
    for split, size in (("wide", (H, W)), ("tall", (W, H))):
        with open(generate_synthetic_crowd(root, split=split, num_images=2, image_size=size, min_objects=3,
                                           max_objects=6, seed=3)) as f:
            parts.append(json.load(f))
    coco = {"images": [], "annotations": [], "categories": parts[0]["categories"]}
    for index in range(2):
        for split, part in zip(("wide", "tall"), parts):
            image = dict(part["images"][index], id=len(coco["images"]) + 1)
            image["file_name"] = f"{split}/{image['file_name']}"
            coco["images"].append(image)
            for ann in part["annotations"]:
                if ann["image_id"] == index + 1:
                    coco["annotations"].append(dict(ann, id=len(coco["annotations"]) + 1, image_id=image["id"]))
    json_file = os.path.join(root, "mixed.json")
    with open(json_file, "w") as f:
        json.dump(coco, f)
    register_coco_json(DATASET, json_file, root, metadata={"thing_classes": list(SYNTHETIC_CROWD_CLASSES)})
    return root


def _cfg(out, config_file="configs/diffdet.synthetic.res18.yaml", *opts):
    # 2 images per evaluation batch: the 4 images in two batches, and 3 images stop mid-loader.
    cfg = tiny_cfg("MODEL.DiffusionDet.NUM_CLASSES", 5, "DATASETS.TRAIN", (DATASET,), "DATASETS.TEST", (DATASET,),
                   "TEST.IMS_PER_BATCH", 2, "SEED", 11, "OUTPUT_DIR", str(out), "MODEL.DiffusionDet.SAMPLE_STEP", 2,
                   "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 10, *opts, config_file=config_file)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def model_and_weights(data, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("figures_out"))
    model = Trainer.build_model(cfg)
    weights = str(tmp_path_factory.mktemp("figures_weights") / "random.pth")
    torch.save({"model": model.state_dict()}, weights)
    return cfg, model, weights


def _xywh(boxes):
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def test_the_drawn_detections_are_those_the_evaluation_scored(model_and_weights):
    cfg, model, weights = model_and_weights
    row, _ = main_job.evaluate(cfg, weights)
    assert (row["steps"], row["boxes"]) == (2, 10)
    with open(os.path.join(cfg.OUTPUT_DIR, "inference", DATASET, "coco_instances_results.json")) as f:
        scored = json.load(f)
    items = predict_first_images(cfg, model, 3)
    assert [r["image_id"] for r, _ in items] == [1, 2, 3]  # the first images, in dataset order
    for record, instances in items:
        # At the image's own size (wide, tall, wide), as evaluated.
        assert instances.image_size == ((H, W) if record["image_id"] % 2 else (W, H))
        mine = sorted(zip(instances.scores.tolist(), _xywh(instances.pred_boxes.tensor).tolist()), reverse=True)
        theirs = sorted((d["score"], d["bbox"]) for d in scored if d["image_id"] == record["image_id"])[::-1]
        assert len(mine) == len(theirs) > 0
        np.testing.assert_allclose([m[0] for m in mine], [t[0] for t in theirs], atol=1e-6)
        np.testing.assert_allclose([m[1] for m in mine], [t[1] for t in theirs], atol=1e-3)


def _raw_tile(path):
    image = cv2.imread(path)[:, :, ::-1]
    return np.repeat(np.repeat(image, S, axis=0), S, axis=1)


def _tiles(fig):
    return [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]


def _instances(boxes, scores, classes, masks=None):
    inst = Instances((H, W))
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    inst.scores = torch.tensor(scores)
    inst.pred_classes = torch.tensor(classes)
    if masks is not None:
        inst.pred_masks = torch.as_tensor(masks)
    return inst


def _changed(tile, raw):
    return np.any(tile.astype(int) != raw.astype(int), axis=2)


def test_predictions_figure_draws_the_detections_above_the_threshold(data):
    path = os.path.join(data, "wide", "000001.png")
    kept, dropped = (8, 30, 40, 70), (80, 20, 120, 60)  # xyxy, apart: no label reaches the other
    inst = _instances([kept, dropped], [0.9, 0.2], [1, 2])
    fig = predictions_figure([({"file_name": path, "image_id": 1}, inst)], MetadataCatalog.get(DATASET), "t",
                             score_threshold=0.3, cols=1)
    (tile,), raw = _tiles(fig), _raw_tile(path)
    assert tile.shape == raw.shape == (S * H, S * W, 3)
    changed = _changed(tile, raw)
    x0, y0, x1, y1 = (S * v for v in kept)
    # The kept box's left and right edges are drawn (within 3 pixels) on most rows it spans...
    rows = range(y0 + 12, y1 - 2)
    assert np.mean([changed[y, x0 - 3 : x0 + 4].any() and changed[y, x1 - 3 : x1 + 4].any() for y in rows]) > 0.9
    # ... the 0.2-scored one is not drawn: its region (and a margin) is the raw image.
    dx0, dy0, dx1, dy1 = (S * v for v in dropped)
    assert not changed[dy0 - 4 : dy1 + 4, dx0 - 4 : dx1 + 4].any()
    assert fig.axes[0].get_title() == "image 1: 1 detection"


def test_predictions_figure_fills_the_masks_of_diffusioninst(data):
    path = os.path.join(data, "wide", "000002.png")
    box = (20, 20, 100, 80)
    mask = np.zeros((1, H, W), bool)
    mask[0, 40:70, 40:90] = True
    meta = MetadataCatalog.get(DATASET)
    item = lambda m: ({"file_name": path, "image_id": 2}, _instances([box], [0.8], [0], m))  # noqa: E731
    with_mask, = _tiles(predictions_figure([item(mask)], meta, "t", cols=1))
    boxes_only, = _tiles(predictions_figure([item(None)], meta, "t", cols=1))
    inside = (slice(S * 45, S * 65), slice(S * 45, S * 85))  # the mask's interior, off its outline
    assert _changed(with_mask, boxes_only)[inside].mean() > 0.95
    assert not _changed(boxes_only, _raw_tile(path))[inside].any()  # a box alone leaves it as it was


def test_write_predictions_figure_runs_the_model_and_writes_the_same_png_twice(model_and_weights, tmp_path):
    cfg, model, weights = model_and_weights
    # The random model's scores are low: a threshold between them so some are drawn, some not.
    scores = torch.cat([i.scores for _, i in predict_first_images(cfg, model, 6)])
    threshold = float(scores.median())
    first, second = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    summary = write_predictions_figure(cfg, weights, first, num_images=6, cols=3, score_threshold=threshold, ap=1.25)
    write_predictions_figure(cfg, weights, second, num_images=6, cols=3, score_threshold=threshold, ap=1.25)
    # Only 4 images in the set: every one, with its count of detections at or above the threshold.
    expected = [{"image_id": r["image_id"], "detections": int((i.scores >= threshold).sum())}
                for r, i in predict_first_images(cfg, model, 6)]
    assert summary["images"] == expected and sum(e["detections"] for e in expected) > 0
    assert f"score \u2265 {threshold:g}" in summary["title"] and "2 steps, 10 boxes, box AP 1.2" in summary["title"]
    image = cv2.imread(first)
    assert image is not None and image.shape[0] > 2 * S * W and image.shape[1] > 3 * S * W
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # pictures, not a blank canvas
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()


def test_write_predictions_figure_of_diffusioninst_predicts_masks(data, tmp_path):
    inst = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
            "MODEL.DiffusionInst.MASK_NORM", "BN"]
    cfg = _cfg(tmp_path, "configs/diffinst.synthetic.res18.yaml", *inst)
    model = Trainer.build_model(cfg)
    items = predict_first_images(cfg, model, 2)
    for _, instances in items:  # masks at the image's size, to be drawn
        assert instances.pred_masks.shape == (len(instances), *instances.image_size) and len(instances) > 0
    assert [i.image_size for _, i in items] == [(H, W), (W, H)]
    weights = str(tmp_path / "random.pth")
    torch.save({"model": model.state_dict()}, weights)
    summary = write_predictions_figure(cfg, weights, str(tmp_path / "p.png"), num_images=2, score_threshold=0.0)
    assert summary["title"].startswith("DiffusionInst on main_job_figures_val")
    assert [s["detections"] for s in summary["images"]] == [len(i) for _, i in items]


TABLE = [  # per-seed AP lists, as run_main_job merges them; rows in the table's (steps, boxes) order
    {"steps": 1, "boxes": 100, "AP": [20.0, 22.0, 24.0]},
    {"steps": 1, "boxes": 300, "AP": [25.0, 25.0, 28.0]},
    {"steps": 4, "boxes": 100, "AP": [30.0, 31.0, 35.0]},
    {"steps": 4, "boxes": 300, "AP": [33.0, 36.0, 39.0]},
]


def test_ap_series_gives_mean_and_sample_std_per_boxes_value():
    series = ap_series(TABLE)
    assert list(series) == [100, 300]
    assert series[100] == {"steps": [1, 4], "mean": [22.0, 32.0], "std": [2.0, pytest.approx(2.6457513)]}
    assert series[300]["mean"] == [26.0, 36.0] and series[300]["std"] == [pytest.approx(1.7320508), 3.0]
    single = ap_series([{"steps": 4, "boxes": 10, "AP": 5.0}, {"steps": 1, "boxes": 10, "AP": 3.0}])
    assert single == {10: {"steps": [1, 4], "mean": [3.0, 5.0], "std": [0.0, 0.0]}}


def test_ap_figure_draws_one_line_per_boxes_value_and_mean_std_bands(tmp_path):
    ax = ap_figure(TABLE, "title").axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"100 boxes": ([1, 4], [22.0, 32.0]), "300 boxes": ([1, 4], [26.0, 36.0])}
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    low_high = sorted((round(v[:, 1].min(), 4), round(v[:, 1].max(), 4)) for v in (b.get_paths()[0].vertices
                                                                                  for b in bands))
    assert low_high == [(20.0, 34.6458), (24.2679, 39.0)]  # 22 - 2 .. 32 + 2.646; 26 - 1.732 .. 36 + 3
    # One seed: the lines without bands.
    single = ap_figure([{**r, "AP": r["AP"][0]} for r in TABLE], "title").axes[0]
    assert not [c for c in single.collections if isinstance(c, PolyCollection)]
    path_a, path_b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    write_ap_figure(TABLE, path_a, "title")
    write_ap_figure(TABLE, path_b, "title")
    image = cv2.imread(path_a)
    assert image is not None and image.shape == (400, 600, 3)
    with open(path_a, "rb") as a, open(path_b, "rb") as b:
        assert a.read() == b.read()


def test_best_row_is_the_highest_mean_ap_and_the_first_on_a_tie():
    assert best_row(TABLE) == TABLE[3]
    tie = [{"steps": s, "boxes": 1, "AP": ap} for s, ap in ((1, 3.0), (2, 5.0), (3, 5.0))]
    assert best_row(tie)["steps"] == 2
    assert best_row([{"AP": [9.0, 1.0]}, {"AP": [6.0, 5.0]}]) == {"AP": [6.0, 5.0]}  # mean 5.5 beats 5.0
