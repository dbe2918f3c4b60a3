"""CrowdHuman AP / mMR / Recall on hand-made cases whose answers are derived in the comments.

Boxes are abs xyxy unless a case writes odgt ``[x, y, w, h]``. With one image, FPPI = FP count.
"""
import json

import numpy as np
import pytest

from diffusiondet.evaluation.crowdhuman import (
    CrowdHumanImage,
    evaluate_crowdhuman,
    main,
    match_image,
)


def _image(boxes, ignore=None, width=200, height=100):
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    ignore = np.zeros(len(boxes), bool) if ignore is None else np.asarray(ignore, bool)
    return CrowdHumanImage(width, height, boxes, ignore)


def _dets(boxes, scores):
    return np.asarray(boxes, dtype=float).reshape(-1, 4), np.asarray(scores, dtype=float)


PEOPLE = [[10, 10, 40, 90], [60, 10, 90, 90], [120, 20, 150, 95]]


def test_perfect_detections():
    gt = {"a": _image(PEOPLE[:2]), "b": _image(PEOPLE[2:])}
    dt = {"a": _dets(PEOPLE[:2], [0.9, 0.8]), "b": _dets(PEOPLE[2:], [0.7])}
    # Recall 1/3, 2/3, 1 at precision 1; the trapezoid skips recall 0 -> 1/3: AP = 2/3.
    # FPPI stays 0 and never reaches 0.01: every reference point takes the last position, miss 0.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 2 / 3, "mMR": 0.0, "Recall": 1.0})


def test_all_misses():
    gt = {"a": _image(PEOPLE)}
    dt = {"a": _dets([[170, 0, 190, 20], [0, 0, 5, 5]], [0.9, 0.8])}
    # Two FPs: recall 0 everywhere, miss rate 1 at every FPPI.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 0.0, "mMR": 1.0, "Recall": 0.0})


def test_duplicate_is_a_false_positive():
    gt = {"a": _image(PEOPLE[:1])}
    dt = {"a": _dets([PEOPLE[0], PEOPLE[0]], [0.9, 0.8])}
    scores, tp = match_image(*dt["a"], gt["a"])
    assert tp.tolist() == [True, False] and scores.tolist() == [0.9, 0.8]
    # Points (r, p) = (1, 1), (1, 0.5): no recall gain after the first point, AP = 0.
    # FPPI 0 then 1: every reference FPPI is first reached at position 1, where miss = 0.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 0.0, "mMR": 0.0, "Recall": 1.0})


def test_first_position_reaching_the_fppi_is_used():
    gt = {"a": _image(PEOPLE[:2])}
    dt = {"a": _dets([PEOPLE[0], [170, 0, 190, 20], PEOPLE[1]], [0.9, 0.8, 0.7])}
    # TP, FP, TP: recall .5, .5, 1; precision 1, .5, 2/3; FPPI 0, 1, 1; miss .5, .5, 0.
    # AP = (.5 - .5)(.5 + 1)/2 + (1 - .5)(2/3 + .5)/2 = 0.5 * 7/12.
    # mMR: FPPI first reaches each reference (<= 1) at position 1 (miss .5), not at the last
    # position with FPPI <= 1 (miss 0, Dollar's rule): mMR = .5.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 7 / 24, "mMR": 0.5, "Recall": 1.0})


def test_detection_inside_an_ignore_region_is_dropped():
    region = [100, 0, 200, 100]
    gt = {"a": _image([PEOPLE[0], region], ignore=[False, True])}
    dt = {"a": _dets([[110, 10, 150, 60], PEOPLE[0]], [0.95, 0.9])}
    scores, tp = match_image(*dt["a"], gt["a"])
    assert scores.tolist() == [0.9] and tp.tolist() == [True]  # the 0.95 one is neither TP nor FP
    # Only the TP is left: AP 0 (single point), FPPI 0 -> miss at the last position = 0. Were it
    # an FP: AP = 1 * (.5 + 0)/2 = .25 and mMR = 1.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 0.0, "mMR": 0.0, "Recall": 1.0})


def test_ignore_regions_use_the_detections_area_and_come_after_real_boxes():
    region = [100, 0, 200, 100]
    person_in_region = [120, 20, 150, 95]
    gt = _image([region, person_in_region], ignore=[True, False])
    # A detection on the person inside the region is a TP (real boxes are tried first); a second
    # one there is absorbed by the region (used-up person, IoA 1); a big box covering the region
    # has IoA = 10000 / 20000 = .5, not > .5: a false positive.
    dt = _dets([person_in_region, person_in_region, [0, 0, 200, 100]], [0.9, 0.8, 0.7])
    scores, tp = match_image(*dt, gt)
    assert scores.tolist() == [0.9, 0.7] and tp.tolist() == [True, False]


def test_match_only_after_clipping():
    # odgt fbox [-50, 10, 100, 50] reaches out of the 100 x 80 image: xyxy [-50, 10, 50, 60].
    gt = {"a": CrowdHumanImage(100, 80, np.array([[-50.0, 10, 50, 60]]), np.array([False]))}
    dt = {"a": _dets([[0, 10, 50, 60]], [0.9])}
    # Unclipped IoU = 2500 / 5000 = .5 (no match); clipped to [0, 10, 50, 60] IoU = 1.
    assert match_image(*dt["a"], gt["a"])[1].tolist() == [True]
    # Clipping also keeps x1 <= W - 1: a detection [99.5, 0, 120, 10] becomes [99, 0, 100, 10].
    edge = CrowdHumanImage(100, 80, np.array([[99.0, 0, 100, 10]]), np.array([False]))
    assert match_image(*_dets([[99.5, 0, 120, 10]], [0.5]), edge)[1].tolist() == [True]


def test_iou_of_exactly_one_half_is_not_a_match():
    gt = _image([[0, 0, 10, 10]])
    assert match_image(*_dets([[0, 0, 10, 5]], [0.9]), gt)[1].tolist() == [False]  # 50 / 100
    assert match_image(*_dets([[0, 0, 10, 5.01]], [0.9]), gt)[1].tolist() == [True]


def test_image_without_people():
    gt = {"a": _image(PEOPLE[:1]), "empty": _image(np.zeros((0, 4)))}
    dt = {"a": _dets(PEOPLE[:1], [0.9]), "empty": _dets([[0, 0, 20, 20]], [0.95])}
    # Default (CrowdHuman): "empty" is not an image of the evaluation; its FP does not count.
    assert evaluate_crowdhuman(gt, dt) == pytest.approx({"AP": 0.0, "mMR": 0.0, "Recall": 1.0})
    # Counted: FP (.95) then TP (.9) over 2 images: recall 0, 1; precision 0, .5;
    # AP = 1 * (.5 + 0) / 2 = .25; FPPI .5, .5 -> every reference up to .5 is reached at
    # position 0 (miss 1), 0.5623 .. 1 are never reached -> last position (miss 0): mMR 0.
    counted = evaluate_crowdhuman(gt, dt, count_images_without_gt=True)
    assert counted == pytest.approx({"AP": 0.25, "mMR": 0.0, "Recall": 1.0})
    # Detections of images missing from the ground truth are ignored.
    assert evaluate_crowdhuman(gt, {**dt, "unknown": _dets(PEOPLE[:1], [1.0])}) == evaluate_crowdhuman(gt, dt)


# The reference record of data_and_evaluation.md §2: mmdetection's CrowdHuman test annotation
# (tests/data/crowdhuman_dataset/test_annotation_train.odgt, Apache-2.0): 6 people and 1 mask.
REFERENCE_FBOXES = [[1330, 317, 418, 1338], [792, 24, 723, 2017], [693, 291, 307, 894],
                    [522, 290, 285, 826], [728, 336, 175, 602], [92, 337, 267, 681]]  # fmt: skip
REFERENCE_MASK = [1387, 353, 320, 285]


def _reference_files(tmp_path):
    boxes = [{"tag": "person", "fbox": b, "extra": {"box_id": i}} for i, b in enumerate(REFERENCE_FBOXES)]
    boxes.append({"tag": "mask", "fbox": REFERENCE_MASK, "extra": {"ignore": 1}})
    record = {"ID": "283554,35288000868e92d4", "width": 1800, "height": 2100, "gtboxes": boxes}
    dtboxes = [{"box": [x + 5, y + 5, w, h], "score": s, "tag": "person"}
               for (x, y, w, h), s in zip(REFERENCE_FBOXES[:5], [0.9, 0.85, 0.8, 0.75, 0.7])]
    x, y, w, h = REFERENCE_FBOXES[0]
    dtboxes += [{"box": [1400, 360, 300, 270], "score": 0.95},  # inside the mask region
                {"box": [1750, 0, 40, 40], "score": 0.5},  # nothing there
                {"box": [x + 10, y, w, h], "score": 0.4}]  # duplicate of person 0
    gt_file, dt_file = tmp_path / "gt.odgt", tmp_path / "dt.odgt"
    gt_file.write_text(json.dumps(record) + "\n")
    dt_file.write_text(json.dumps({"ID": record["ID"], "dtboxes": dtboxes}) + "\n")
    return gt_file, dt_file


def test_reference_vector_through_the_command_line(tmp_path, capsys):
    gt_file, dt_file = _reference_files(tmp_path)
    assert main(["--gt", str(gt_file), "--dt", str(dt_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    # Published for this vector: AP 0.6667, mMR 0.1667, Recall 0.8333 (5 of 6 people found).
    assert result == pytest.approx({"AP": 2 / 3, "mMR": 1 / 6, "Recall": 5 / 6}, abs=1e-6)


def test_coco_results_json_through_the_command_line(tmp_path, capsys):
    gt_file, _ = _reference_files(tmp_path)
    coco_gt = {"images": [{"id": 7, "file_name": "Images/283554,35288000868e92d4.jpg",
                           "width": 1800, "height": 2100}]}  # fmt: skip
    results = [{"image_id": 7, "category_id": 1, "bbox": [x + 5, y + 5, w, h], "score": 0.9 - 0.05 * i}
               for i, (x, y, w, h) in enumerate(REFERENCE_FBOXES)]
    results.append({"image_id": 7, "category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.99})
    (tmp_path / "coco.json").write_text(json.dumps(coco_gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    args = ["--gt", str(gt_file), "--dt", str(tmp_path / "results.json"),
            "--coco-gt", str(tmp_path / "coco.json"), "--category-id", "1"]  # fmt: skip
    assert main(args) == 0
    # All 6 people found at precision 1: AP = 5/6 (the first 1/6 of recall is not counted).
    assert json.loads(capsys.readouterr().out) == pytest.approx({"AP": 5 / 6, "mMR": 0.0, "Recall": 1.0})
    with pytest.raises(ValueError, match="image_id 7"):
        (tmp_path / "coco.json").write_text(json.dumps({"images": []}))
        main(args)
