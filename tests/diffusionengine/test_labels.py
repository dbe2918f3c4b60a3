"""filter_labels: each rule on a hand-made case (boxes abs xyxy on a non-square 60 x 100 image)."""
import pytest
import torch

from diffusionengine.labels import filter_labels

IMAGE_HW = (60, 100)  # (h, w)
RULES = dict(score_thresh=0.3, nms_thresh=0.5, min_size=2.0, max_per_image=100)


def _filter(boxes, scores, classes, **overrides):
    return filter_labels(
        torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores), torch.tensor(classes),
        IMAGE_HW, **{**RULES, **overrides},
    )  # fmt: skip


def test_score_threshold_is_strict():
    out = _filter([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [0.3, 0.31, 0.9], [0, 0, 0])
    assert out.indices.tolist() == [2, 1]  # 0.3 itself is not above delta = 0.3
    assert out.scores.tolist() == pytest.approx([0.9, 0.31])


def test_nms_is_class_wise():
    boxes = [[10, 10, 30, 30], [11, 11, 31, 31], [10, 10, 30, 30], [50, 10, 70, 30]]
    out = _filter(boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0])
    # 1 overlaps 0 (same class, IoU 0.82): gone; 2 overlaps 0 too but is another class: kept.
    assert out.indices.tolist() == [0, 2, 3]
    assert out.classes.tolist() == [0, 1, 0]
    # A looser NMS keeps the overlapping pair.
    assert _filter(boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 1, 0], nms_thresh=0.9).indices.tolist() == [0, 1, 2, 3]


def test_boxes_are_clipped_to_the_image_width_and_height():
    out = _filter([[-5, -3, 40, 80], [90, 50, 130, 70]], [0.9, 0.8], [0, 1])
    # x clipped to w = 100 and y to h = 60 (a transposed clip would give other numbers).
    assert out.boxes.tolist() == [[0, 0, 40, 60], [90, 50, 100, 60]]


def test_boxes_thinner_than_min_size_after_clipping_are_dropped():
    boxes = [[10, 10, 11.5, 40], [10, 10, 40, 12], [98.5, 10, 120, 40], [10, 10, 40, 11.9], [50, 20, 52, 22]]
    out = _filter(boxes, [0.9, 0.9, 0.9, 0.9, 0.9], [0, 1, 2, 3, 4])
    # 0: 1.5 px wide; 3: 1.9 px tall; 2: 1.5 px wide once clipped at x = 100; 1 and 4: exactly 2 px.
    assert out.indices.tolist() == [1, 4]
    assert _filter(boxes, [0.9] * 5, [0, 1, 2, 3, 4], min_size=0.0).indices.tolist() == [0, 1, 2, 3, 4]


def test_allow_list_keeps_only_the_given_classes():
    boxes = [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]]
    out = _filter(boxes, [0.5, 0.6, 0.7], [0, 1, 2], allowed_classes=[2, 0])
    assert out.indices.tolist() == [2, 0]
    assert _filter(boxes, [0.5, 0.6, 0.7], [0, 1, 2], allowed_classes=()).indices.tolist() == [2, 1, 0]


def test_cap_keeps_the_top_scores_and_ties_keep_input_order():
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(5)]
    out = _filter(boxes, [0.4, 0.9, 0.5, 0.9, 0.8], [0, 0, 0, 0, 0], max_per_image=3)
    assert out.indices.tolist() == [1, 3, 4]
    assert len(_filter(boxes, [0.4, 0.9, 0.5, 0.9, 0.8], [0] * 5, max_per_image=0)) == 5  # 0 = no cap


def test_empty_and_all_rejected_inputs_give_empty_labels():
    empty = filter_labels(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), IMAGE_HW, **RULES)
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    assert len(_filter([[0, 0, 10, 10]], [0.1], [0])) == 0


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"boxes \(N, 4\)"):
        filter_labels(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3), IMAGE_HW, **RULES)
