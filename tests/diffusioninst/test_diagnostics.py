"""diffusioninst/diagnostics.py and tools/diagnose_inst.py by value, on a tiny CPU DiffusionInst.

The datasets are hand-made COCO jsons of non-square images whose objects are axis-aligned
rectangles (so a mask filling its box is the GT mask), resized by the test resize (short side
64, long side at most 96) by a known factor.
"""
import importlib.util
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import diffusioninst.modeling.meta_arch as inst_meta_arch
from diffusiondet.data.datasets import register_coco_json
from diffusioninst import diagnostics
from diffusioninst.diagnostics import loss_curves, object_size_report, oracle_box_mask_evaluation
from diffusioninst.modeling import DiffusionInstHead

from ..utils import TINY_OPTS, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INST = "configs/diffinst.synthetic.res18.yaml"
INST_OPTS = ["MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NUM_CONVS", 1,
             "MODEL.DiffusionInst.MASK_NORM", "BN"]  # fmt: skip
CLASSES = ["a", "b", "c"]


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _write_coco(root, images):
    """images: [(height, width, [(x, y, w, h, class, segmentation or None, iscrowd)])] ->
    (json path, image folder); the image pixels are flat grey."""
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    for image_id, (height, width, objects) in enumerate(images, start=1):
        name = f"{image_id}.png"
        cv2.imwrite(os.path.join(root, "img", name), np.full((height, width, 3), 128, np.uint8))
        coco["images"].append({"id": image_id, "file_name": name, "height": height, "width": width})
        for x, y, w, h, cls, seg, crowd in objects:
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": cls + 1,
                "bbox": [float(x), float(y), float(w), float(h)], "area": w * h, "iscrowd": crowd, "segmentation": seg or _rect(x, y, w, h),
            })  # fmt: skip
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path, os.path.join(root, "img")


def _register(name, root, images):
    json_file, image_root = _write_coco(str(root), images)
    register_coco_json(name, json_file, image_root, metadata={"thing_classes": CLASSES})
    return name


# 80 x 120 images: the test resize scales them by 0.8 to 64 x 96. Large, disjoint rectangles.
RECT_IMAGES = [
    (80, 120, [(4, 4, 52, 44, 0, None, 0), (62, 8, 52, 66, 1, None, 0)]),
    (80, 120, [(8, 15, 100, 55, 2, None, 0)]),
    (80, 120, [(6, 6, 50, 68, 0, None, 0), (60, 10, 56, 60, 1, None, 0)]),
]


def inst_cfg(dataset, *opts):
    return tiny_cfg(*INST_OPTS, "DATASETS.TEST", (dataset,), "DATASETS.TRAIN", (dataset,), *opts, config_file=INST)


@pytest.fixture(scope="module")
def rects(tmp_path_factory):
    """(dataset name, weights of an untrained tiny DiffusionInst, its cfg, output root)."""
    root = tmp_path_factory.mktemp("diagnostics")
    name = _register("diagnostics_rects", root / "data", RECT_IMAGES)
    cfg = inst_cfg(name, "OUTPUT_DIR", str(root / "out"))
    torch.manual_seed(0)
    weights = str(root / "model.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return name, weights, cfg, root


def _constant_mask_logits(value):
    def fake(mask_feat, params, image_index, spec, *placement):
        return torch.full((params.shape[0], *mask_feat.shape[-2:]), float(value))

    return fake


@pytest.mark.parametrize("logit, mask_ap", [(20.0, 100.0), (-20.0, 0.0)])
def test_oracle_scores_gt_boxes_with_the_masks_the_filters_give(rects, monkeypatch, tmp_path, logit, mask_ap):
    # Filters that fill the whole map give, clipped to the GT box, the GT rectangle: mask AP 100;
    # filters that give nothing: mask AP 0. The boxes are the GT ones with score 1: box AP 100.
    name, weights, cfg, _ = rects
    monkeypatch.setattr(inst_meta_arch, "dynamic_mask_logits", _constant_mask_logits(logit))
    results = oracle_box_mask_evaluation(cfg, weights, output_folder=str(tmp_path))
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(mask_ap)
    with open(tmp_path / "coco_instances_results.json") as f:
        detections = json.load(f)
    assert len(detections) == 5 and {d["score"] for d in detections} == {1.0}
    boxes = sorted((d["image_id"], d["category_id"], *np.round(d["bbox"], 3)) for d in detections)
    expected = sorted((i + 1, c + 1, float(x), float(y), float(w), float(h))
                      for i, (_, _, objs) in enumerate(RECT_IMAGES) for x, y, w, h, c, _, _ in objs)  # fmt: skip
    assert boxes == expected  # GT boxes and classes, back in the original frame


def test_oracle_runs_the_final_stage_filters_of_the_gt_boxes(rects, monkeypatch, tmp_path):
    # The head gets exactly the test-resized GT boxes (x 0.8) at t = T-1 (or the asked t), and the
    # masks are made from the final stage's filters of that call, row for row.
    name, weights, cfg, _ = rects
    calls, used = [], []
    real_head = DiffusionInstHead.forward

    def head_spy(self, features, boxes, t):
        out = real_head(self, features, boxes, t)
        calls.append((boxes.clone(), t.clone(), out["pred_kernels"].clone()))
        return out

    def logits_spy(mask_feat, params, image_index, spec, *placement):
        used.append(params.clone())
        return torch.zeros((params.shape[0], *mask_feat.shape[-2:]))

    monkeypatch.setattr(DiffusionInstHead, "forward", head_spy)
    monkeypatch.setattr(inst_meta_arch, "dynamic_mask_logits", logits_spy)
    for t in (None, 0):
        calls.clear(), used.clear()
        oracle_box_mask_evaluation(cfg, weights, timestep=t, output_folder=str(tmp_path))
        assert len(calls) == len(used) == 3
        for (boxes, times, kernels), params, (_, _, objs) in zip(calls, used, RECT_IMAGES):
            gt = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, *_ in objs], dtype=torch.float32) * 0.8
            torch.testing.assert_close(boxes[0], gt)
            assert times.tolist() == [999 if t is None else t]
            assert kernels.shape[0] == cfg.MODEL.DiffusionDet.NUM_HEADS
            torch.testing.assert_close(params, kernels[-1, 0])


def _metrics(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_loss_curves_sum_stages_and_give_shares_of_total_loss(tmp_path):
    stage = lambda ce, l1, giou, dice, s="": {f"loss_ce{s}": ce, f"loss_bbox{s}": l1, f"loss_giou{s}": giou,
                                             f"loss_masks{s}": dice}  # noqa: E731  fmt: skip
    rows = [
        {"iteration": 0, "total_loss": 10.0, "lr": 0.1, **stage(1.0, 0.5, 0.5, 3.0), **stage(2.0, 1.0, 1.0, 1.0, "_0")},
        {"iteration": 4, "bbox/AP": 3.0},  # an evaluation line: no losses
        {"iteration": 9, "total_loss": 4.0, **stage(0.25, 0.25, 0.5, 1.0), **stage(0.5, 0.25, 0.25, 1.0, "_0")},
    ]  # fmt: skip
    _metrics(tmp_path / "metrics.json", rows)
    curves = loss_curves(str(tmp_path / "metrics.json"))
    assert curves["terms"]["loss_ce_0"] == {"iterations": [0, 9], "values": [2.0, 0.5]}
    summed = curves["summed"]
    assert summed["loss_ce"]["values"] == [3.0, 0.75]
    assert summed["box"] == {"iterations": [0, 9], "values": [6.0, 2.0]}
    assert summed["mask"]["values"] == [4.0, 2.0]
    assert curves["shares"]["box"] == {"start": 0.6, "end": 0.5}
    assert curves["shares"]["mask"] == {"start": 0.4, "end": 0.5}
    assert curves["shares"]["loss_giou"] == {"start": 0.15, "end": 0.1875}
    diagnostics.write_loss_figure(curves, str(tmp_path / "loss.png"))
    assert cv2.imread(str(tmp_path / "loss.png")) is not None


def test_object_size_report_quantiles_after_the_test_resize(tmp_path):
    # Squares of sides 8, 24, 40 (80 x 120 image, scale 0.8) and 16, 32 (100 x 150, scale 0.64)
    # after the resize; the 40 square's mask is a half-box triangle; a crowd object is left out.
    tri = [[10, 10, 60, 10, 10, 60]]
    name = _register("diagnostics_sizes", tmp_path, [
        (80, 120, [(5, 5, 10, 10, 0, None, 0), (20, 20, 30, 30, 1, None, 0), (60, 10, 50, 50, 0, tri, 0),
                   (0, 0, 100, 70, 2, None, 1)]),
        (100, 150, [(5, 5, 25, 25, 0, None, 0), (50, 40, 50, 50, 1, None, 0)]),
    ])  # fmt: skip
    report = object_size_report(inst_cfg(name), name)
    assert report["mask_in_strides"] == {"p2": 4, "p3": 8, "p4": 16} and report["mask_stride"] == 4
    assert report["mask_map_hw"] == [16.0, 24.0]  # 64 x 96 input, padded to 32: 64 x 96
    box = report["box_sqrt_area"]
    assert box["count"] == 5
    assert box["quantiles_px"] == pytest.approx([8, 11.2, 16, 24, 32, 36.8, 40])
    assert box["quantiles_cells"] == pytest.approx([2, 2.8, 4, 6, 8, 9.2, 10])
    assert box["fraction_below_cells"] == {"2": 0.0, "4": pytest.approx(0.2)}
    assert report["box_short_side"]["quantiles_px"] == pytest.approx(box["quantiles_px"])
    mask = report["mask_sqrt_area"]["quantiles_px"]
    assert (mask[0], mask[3], mask[4], mask[6]) == pytest.approx((8, 24, 40 / math.sqrt(2), 32))


def _tool():
    spec = importlib.util.spec_from_file_location("diagnose_inst", os.path.join(REPO, "tools", "diagnose_inst.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnose_inst_tool_prints_tables_and_writes_files(rects, monkeypatch, tmp_path, capsys):
    name, weights, cfg, root = rects
    _metrics(os.path.join(os.path.dirname(weights), "metrics.json"), [
        {"iteration": 0, "total_loss": 2.0, "loss_ce": 0.5, "loss_bbox": 0.25, "loss_giou": 0.25, "loss_masks": 1.0},
        {"iteration": 1, "total_loss": 1.0, "loss_ce": 0.25, "loss_bbox": 0.25, "loss_giou": 0.25, "loss_masks": 0.25},
    ])  # fmt: skip
    monkeypatch.setattr(inst_meta_arch, "dynamic_mask_logits", _constant_mask_logits(20.0))
    out = tmp_path / "diag"
    opts = [str(v) for v in INST_OPTS + ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(root / "out")]]
    _tool().main(["--config-file", os.path.join(REPO, INST), "--weights", weights, "--output-dir", str(out),
                  "--oracle-t", "999", "--opts", *map(str, TINY_OPTS), *opts])  # fmt: skip
    stdout = capsys.readouterr().out
    assert "| 999 | 100.0 | 100.0 |" in stdout
    assert "| box | 1 | 0.75 | 0.500 | 0.750 |" in stdout and "| mask | 1 | 0.25 | 0.500 | 0.250 |" in stdout
    assert "mask stride 4" in stdout
    assert "| 1 | center | 100.0 | 100.0 | 100.0 |" in stdout  # the stride-ceiling table's stride-1 row
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "loss_curves.json", "loss_curves.png", "object_sizes.json", "oracle_masks.json", "stride_ceiling.json"]
    with open(out / "oracle_masks.json") as f:
        assert json.load(f)["by_timestep"]["999"]["segm"]["AP"] == pytest.approx(100.0)



def test_stride_ceiling_round_trip_by_hand():
    # A 7 x 10 rectangle at (1, 2) in a 12 x 16 image, no resize: stride 1 returns it exactly;
    # at stride 4 both target modes give an approximation (different ones), clipped to the box.
    from diffusioninst.stride_ceiling import round_trip_masks

    masks = torch.zeros(1, 12, 16, dtype=torch.bool)
    masks[0, 2:9, 1:11] = True
    boxes = torch.tensor([[1.0, 2.0, 11.0, 9.0]])
    exact = round_trip_masks(masks, boxes, (12, 16), 1)
    assert torch.equal(exact, masks)
    centre = round_trip_masks(masks, boxes, (12, 16), 4)
    area = round_trip_masks(masks, boxes, (12, 16), 4, mode="area")
    iou = lambda m: float((m & masks).sum() / (m | masks).sum())  # noqa: E731
    assert 0.5 < iou(centre) < 1.0 and 0.5 < iou(area) < 1.0 and not torch.equal(centre, area)
    assert not (area[0, :, 11:].any() or area[0, 9:].any())  # clipped to the box


def test_stride_ceiling_ap_falls_with_the_stride(tmp_path):
    # Without a test resize, stride 1 returns every GT mask exactly (AP 100); coarser grids
    # lose small objects first; the test resize alone (x 0.8 and back) costs some AP.
    from diffusioninst.stride_ceiling import stride_ceiling_ap

    name = _register("ceiling_rects", tmp_path, [
        (80, 120, [(5, 5, 7, 9, 0, None, 0), (20, 20, 30, 30, 1, None, 0), (60, 10, 50, 50, 2, [[60, 10, 110, 10, 60, 60]], 0)]),
        (100, 150, [(5, 5, 13, 11, 0, None, 0), (50, 40, 50, 50, 1, None, 0)]),
    ])  # fmt: skip
    cfg = inst_cfg(name, "INPUT.MIN_SIZE_TEST", 0)
    report = stride_ceiling_ap(cfg, name, strides=(1, 4, 8))
    ap = {s: v["AP"] for s, v in report["by_stride"].items()}
    assert report["num_objects"] == 5 and report["mode"] == "center"
    assert ap["1"] == pytest.approx(100.0)
    assert 100.0 > ap["4"] > ap["8"]
    assert stride_ceiling_ap(inst_cfg(name), name, strides=(1,))["by_stride"]["1"]["AP"] < 100.0
    area = stride_ceiling_ap(cfg, name, strides=(8,), mode="area")
    assert area["by_stride"]["8"]["AP"] > ap["8"]
