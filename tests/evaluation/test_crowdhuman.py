"""CrowdHuman AP / mMR / Recall on hand-made cases whose answers are derived in the comments.

Boxes are abs xyxy unless a case writes odgt ``[x, y, w, h]``. With one image, FPPI = FP count.
"""
import json
import warnings

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


# The reference record: mmdetection's CrowdHuman test annotation
# (tests/data/crowdhuman_dataset/test_annotation_train.odgt, Apache-2.0): 6 people and 1 mask.
REFERENCE_FBOXES = [[1330, 317, 418, 1338], [792, 24, 723, 2017], [693, 291, 307, 894],
                    [522, 290, 285, 826], [728, 336, 175, 602], [92, 337, 267, 681]]  # fmt: skip
REFERENCE_MASK = [1387, 353, 320, 285]


REFERENCE_ID = "283554,35288000868e92d4"
_ABSENT = object()


def _reference_dtboxes(tags):
    """The reference detections (8), the i-th tagged ``tags[i % len(tags)]`` (_ABSENT: no tag)."""
    dtboxes = [{"box": [x + 5, y + 5, w, h], "score": s}
               for (x, y, w, h), s in zip(REFERENCE_FBOXES[:5], [0.9, 0.85, 0.8, 0.75, 0.7])]
    x, y, w, h = REFERENCE_FBOXES[0]
    dtboxes += [{"box": [1400, 360, 300, 270], "score": 0.95},  # inside the mask region
                {"box": [1750, 0, 40, 40], "score": 0.5},  # nothing there
                {"box": [x + 10, y, w, h], "score": 0.4}]  # duplicate of person 0
    for i, box in enumerate(dtboxes):
        if tags[i % len(tags)] is not _ABSENT:
            box["tag"] = tags[i % len(tags)]
    return dtboxes


def _reference_files(tmp_path, tags=("person", _ABSENT), extra_dtboxes=(), sizes_in="gt"):
    """GT and detection odgt files of the reference record; ``sizes_in`` names the file whose
    line carries width / height ("gt" as in the mmdetection file, "dt" as in CrowdDet's)."""
    boxes = [{"tag": "person", "fbox": b, "extra": {"box_id": i}} for i, b in enumerate(REFERENCE_FBOXES)]
    boxes.append({"tag": "mask", "fbox": REFERENCE_MASK, "extra": {"ignore": 1}})
    size = {"width": 1800, "height": 2100}
    record = {"ID": REFERENCE_ID, **(size if sizes_in == "gt" else {}), "gtboxes": boxes}
    dt_record = {"ID": REFERENCE_ID, **(size if sizes_in == "dt" else {}),
                 "dtboxes": _reference_dtboxes(tags) + list(extra_dtboxes)}  # fmt: skip
    gt_file, dt_file = tmp_path / "gt.odgt", tmp_path / "dt.odgt"
    gt_file.write_text(json.dumps(record) + "\n")
    dt_file.write_text(json.dumps(dt_record) + "\n")
    return gt_file, dt_file


def _run(capsys, gt_file, dt_file):
    assert main(["--gt", str(gt_file), "--dt", str(dt_file)]) == 0
    return json.loads(capsys.readouterr().out)


REFERENCE_RESULT = {"AP": 2 / 3, "mMR": 1 / 6, "Recall": 5 / 6}


def test_reference_vector_through_the_command_line(tmp_path, capsys):
    gt_file, dt_file = _reference_files(tmp_path)
    # Published for this vector: AP 0.6667, mMR 0.1667, Recall 0.8333 (5 of 6 people found).
    assert _run(capsys, gt_file, dt_file) == pytest.approx(REFERENCE_RESULT, abs=1e-6)


@pytest.mark.parametrize("tags", [(1,), ("person",), (_ABSENT,), ("1",), (1.0,), (1, "person", _ABSENT)],
                         ids=["CrowdDet 1", "person", "absent", "string 1", "float 1", "mixed"])  # fmt: skip
def test_every_person_tag_convention_gives_the_same_numbers(tmp_path, capsys, tags):
    # CrowdDet's layout: the sizes are on the detection lines, annotation_val.odgt has none.
    gt_file, dt_file = _reference_files(tmp_path, tags, sizes_in="dt")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*excluded")
        assert _run(capsys, gt_file, dt_file) == pytest.approx(REFERENCE_RESULT, abs=1e-6)


def test_other_tags_are_excluded_with_a_warning(tmp_path, capsys):
    # Each of these would change the numbers if it were taken as a person: the first three find the
    # missed person 5 at the top score (Recall 1), the last is a top-score false positive.
    x, y, w, h = REFERENCE_FBOXES[5]
    others = [{"box": [x, y, w, h], "score": 0.99, "tag": tag} for tag in (2, True, "mask")]
    others.append({"box": [0, 0, 50, 50], "score": 0.98, "tag": 2})
    gt_file, dt_file = _reference_files(tmp_path, (1,), others, sizes_in="dt")
    with pytest.warns(UserWarning) as record:
        result = _run(capsys, gt_file, dt_file)
    assert result == pytest.approx(REFERENCE_RESULT, abs=1e-6)
    [warning] = [str(w.message) for w in record if "excluded" in str(w.message)]
    assert warning.startswith(f"{dt_file}: excluded 4 of 12 detections (2 with tag 2, 1 with tag true, "
                              '1 with tag "mask")')  # fmt: skip


def test_a_file_without_any_person_is_an_error(tmp_path):
    gt_file, dt_file = _reference_files(tmp_path, (2, "mask"), sizes_in="dt")
    with pytest.raises(ValueError, match=rf"{dt_file}: all 8 detections were excluded \(4 with tag 2, 4 with"):
        main(["--gt", str(gt_file), "--dt", str(dt_file)])


def test_ground_truth_without_sizes_and_an_image_without_detections(tmp_path, capsys):
    people_b = [[20, 10, 30, 60], [100, 10, 30, 60]]  # odgt xywh, 2 people never detected
    gt_lines = [{"ID": "a", "gtboxes": [{"tag": "person", "fbox": [x1, y1, x2 - x1, y2 - y1]}
                                        for x1, y1, x2, y2 in PEOPLE[:2]]},
                {"ID": "b", "gtboxes": [{"tag": "person", "fbox": b} for b in people_b]}]  # fmt: skip
    dtboxes = [{"box": [10, 10, 30, 80], "score": 0.9, "tag": 1},  # person a0
               {"box": [150, 0, 20, 20], "score": 0.8, "tag": 1},  # nothing there
               {"box": [60, 10, 30, 80], "score": 0.7, "tag": 1}]  # person a1
    gt_file, dt_file = tmp_path / "gt.odgt", tmp_path / "dt.odgt"
    gt_file.write_text("".join(json.dumps(line) + "\n" for line in gt_lines))
    dt_file.write_text(json.dumps({"ID": "a", "width": 200, "height": 100, "dtboxes": dtboxes}) + "\n")
    # TP, FP, TP over 4 people and 2 images (b counts, all its people missed): recall .25 .25 .5,
    # precision 1 .5 2/3, AP = .25 (2/3 + .5) / 2 = 7/48. FPPI 0 .5 .5, miss .75 .75 .5: the 7
    # references <= .5 are first reached at position 1 (miss .75), 0.5623 and 1 never (last
    # position, miss .5): mMR = .75^(7/9) .5^(2/9). Were b left out: Recall 1, AP 7/24, mMR .5.
    expected = {"AP": 7 / 48, "mMR": 0.75 ** (7 / 9) * 0.5 ** (2 / 9), "Recall": 0.5}
    assert _run(capsys, gt_file, dt_file) == pytest.approx(expected, abs=1e-6)
    # b on a line of its own without boxes is the same as b missing from the file.
    dt_file.write_text(dt_file.read_text() + json.dumps({"ID": "b", "dtboxes": []}) + "\n")
    assert _run(capsys, gt_file, dt_file) == pytest.approx(expected, abs=1e-6)
    # An image with detections still needs a size to clip them.
    dt_file.write_text(json.dumps({"ID": "a", "dtboxes": dtboxes}) + "\n")
    with pytest.raises(ValueError, match="no image size for 'a'"):
        main(["--gt", str(gt_file), "--dt", str(dt_file)])


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
    # A category that no result has is an error, not an AP of 0.
    with pytest.raises(ValueError, match=r"all 7 detections were excluded \(6 with category_id 1, 1 with"):
        main(args[:-1] + ["3"])
    with pytest.raises(ValueError, match="image_id 7"):
        (tmp_path / "coco.json").write_text(json.dumps({"images": []}))
        main(args)
