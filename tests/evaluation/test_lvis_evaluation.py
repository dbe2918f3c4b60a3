"""LVIS evaluation through detectron2's LVISEvaluator on a tiny made-up LVIS json whose frequency
groups r / c / f are all present: with faster-coco-eval (the default backend) and with the lvis
0.5.3 API on numpy 2 (TEST.COCO_EVAL_BACKEND pycocotools), which give the same numbers."""
import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from diffusiondet.engine import Trainer
from diffusiondet.evaluation.coco_backend import FasterLVISEvaluator, build_lvis_evaluator
from tests.utils import tiny_cfg

GT = {  # image id -> [(category id, abs xywh)]
    1: [(1, [10, 10, 40, 30]), (2, [60, 20, 30, 50])],
    2: [(1, [5, 5, 50, 60])],
    3: [(3, [20, 30, 40, 40])],
    4: [(1, [30, 10, 30, 30])],
}
# Category 2 is verified absent from image 2 (a detection there is a false positive) and not
# checked on image 4 (a detection there is ignored): LVIS's federated annotation.
NEG = {1: [3], 2: [2], 3: [1], 4: [3]}
NOT_EXHAUSTIVE = {1: [], 2: [], 3: [], 4: []}


@pytest.fixture(scope="module")
def lvis_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lvis")
    images = [{"id": i, "width": 120, "height": 90, "coco_url": f"http://x/val2017/{i:012d}.jpg",
               "neg_category_ids": NEG[i], "not_exhaustive_category_ids": NOT_EXHAUSTIVE[i]}
              for i in GT]  # fmt: skip
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                    "segmentation": [_rectangle_polygon(b)]}
                   for n, (i, c, b) in enumerate(((i, c, b) for i in GT for c, b in GT[i]), 1)]
    categories = [{"id": 1, "name": "cup", "frequency": "f"}, {"id": 2, "name": "cat", "frequency": "c"},
                  {"id": 3, "name": "yak", "frequency": "r"}]  # fmt: skip
    json_file = root / "lvis_tiny_val.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    name = "lvis_v1_tiny_test_val"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(json_file), evaluator_type="lvis",
                                  thing_classes=["cup", "cat", "yak"])  # fmt: skip
    return name


def _rectangle_polygon(xywh):
    x, y, w, h = xywh
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _predictions(extra=(), masks=None):
    """Perfect detections (score 0.9) plus ``extra`` (image id, category id, xywh, score).

    ``masks``: None (boxes only), "boxes" (each mask fills its box: perfect for the rectangular
    GT polygons) or "top_half" (only the upper half of each box).
    """
    rows = [(i, c, b, 0.9) for i in GT for c, b in GT[i]] + list(extra)
    outputs = {}
    for i, c, (x, y, w, h), s in rows:
        outputs.setdefault(i, []).append(([x, y, x + w, y + h], s, c - 1))  # 0-based classes
    inputs, results = [], []
    for i, dets in outputs.items():
        inst = Instances((90, 120))
        inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32))
        inst.scores = torch.tensor([d[1] for d in dets])
        inst.pred_classes = torch.tensor([d[2] for d in dets])
        if masks is not None:
            inst.pred_masks = torch.zeros(len(dets), 90, 120, dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(inst.pred_masks, (d[0] for d in dets)):
                y_end = y1 if masks == "boxes" else (y0 + y1) // 2
                mask[y0:y_end, x0:x1] = True
        inputs.append({"image_id": i})
        results.append({"instances": inst})
    return inputs, results


def _evaluate(name, tmp_path, extra=(), masks=None, task="bbox", backend="auto", max_dets=None):
    if max_dets is None:  # the trainer's evaluator (LVIS's cap, 300)
        evaluator = Trainer.build_evaluator(tiny_cfg("TEST.COCO_EVAL_BACKEND", backend), name, str(tmp_path))
    else:
        evaluator = build_lvis_evaluator(name, backend, None, True, str(tmp_path), max_dets_per_image=max_dets)
    evaluator.reset()
    evaluator.process(*_predictions(extra, masks))
    return evaluator.evaluate()[task]


def test_perfect_detections_score_100(lvis_dataset, tmp_path):
    result = _evaluate(lvis_dataset, tmp_path)
    assert "float" in np.__dict__  # the compat shim was applied by build_evaluator
    assert [result[k] for k in ("AP", "APr", "APc", "APf")] == pytest.approx([100.0] * 4)


def test_federated_false_positives(lvis_dataset, tmp_path):
    # A "cat" (category 2, the only "c" class) scoring above the true cat: on image 2, where cats
    # are verified absent, it is a false positive -> precision 1/2 at every recall -> APc = 50 and
    # AP = (100 + 50 + 100) / 3. On image 4, where cats were not checked, it is ignored.
    wrong_cat = [2, 2, [70, 10, 30, 30], 0.95]
    result = _evaluate(lvis_dataset, tmp_path, [tuple(wrong_cat)])
    assert result["APc"] == pytest.approx(50.0) and result["APf"] == pytest.approx(100.0)
    assert result["AP"] == pytest.approx(250.0 / 3)
    wrong_cat[0] = 4
    assert _evaluate(lvis_dataset, tmp_path, [tuple(wrong_cat)])["AP"] == pytest.approx(100.0)


def test_mask_ap_from_pred_masks(lvis_dataset, tmp_path):
    # DiffusionInst's LVIS mask AP: the evaluator scores "segm" because predictions carry masks.
    # Masks covering only the top half of each (rectangular) object have IoU 0.5: below every
    # threshold from 0.55 up, so mask AP = 1/10 of perfect while box AP stays 100.
    perfect = _evaluate(lvis_dataset, tmp_path, masks="boxes", task="segm")
    assert perfect["AP"] == pytest.approx(100.0)
    half = _evaluate(lvis_dataset, tmp_path, masks="top_half", task="segm")
    assert half["AP"] == pytest.approx(10.0, abs=0.5) and half["AP50"] == pytest.approx(100.0)
    assert _evaluate(lvis_dataset, tmp_path, masks="top_half")["AP"] == pytest.approx(100.0)


def _random_extras(seed=0, count=14):
    """Integer boxes (the masks are painted by slicing) near the objects or anywhere, on every
    category: right and wrong classes, verified-absent and unchecked ones; rounded, tied scores."""
    rng = np.random.RandomState(seed)
    objects = [(i, c, b) for i in GT for c, b in GT[i]]
    extras = []
    for k in range(count):
        i, c, (x, y, w, h) = objects[rng.randint(len(objects))]
        if k % 3 == 2:
            i, x, y = int(rng.randint(1, 5)), int(rng.randint(0, 70)), int(rng.randint(0, 40))
        dx, dy, dw, dh = (int(v) for v in rng.randint(-6, 7, size=4))
        box = [max(x + dx, 0), max(y + dy, 0), max(w + dw, 4), max(h + dh, 4)]
        extras.append((i, int(rng.randint(1, 4)) if k % 4 == 1 else c, box, round(float(rng.uniform(0.2, 1.0)), 2)))
    return extras


@pytest.mark.parametrize("masks", [None, "top_half"], ids=["bbox", "segm"])
@pytest.mark.parametrize("max_dets", [None, 1], ids=["cap300", "cap1"])
def test_faster_backend_equals_the_lvis_api(lvis_dataset, tmp_path, masks, max_dets, evaluations_run):
    # Cap 1 binds: LVIS keeps the best detection of each image over all categories (image 1: one
    # of its two tied perfect ones), faster-coco-eval alone would keep the best of each category.
    task = "segm" if masks else "bbox"
    runs = {backend: _evaluate(lvis_dataset, tmp_path, _random_extras(), masks, task, backend, max_dets)
            for backend in ("pycocotools", "auto")}  # fmt: skip
    assert evaluations_run == (["lvis"] * 2 + ["faster"] * 2 if masks else ["lvis", "faster"])
    reference = runs["pycocotools"]
    assert list(reference) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"]
    assert 1 < reference["AP"] < 95  # neither empty nor perfect: a number that can be wrong
    assert runs["auto"] == pytest.approx(reference, abs=1e-2)  # percent: 1e-4 of AP


def test_trainer_builds_the_faster_lvis_evaluator_by_default(lvis_dataset, tmp_path):
    assert type(Trainer.build_evaluator(tiny_cfg(), lvis_dataset, str(tmp_path))) is FasterLVISEvaluator
    forced = Trainer.build_evaluator(tiny_cfg("TEST.COCO_EVAL_BACKEND", "pycocotools"), lvis_dataset, str(tmp_path))
    assert type(forced).__name__ == "LVISEvaluator"
