"""The TTA merges of diffusiondet/modeling/tta_merge.py on hand cases with exact expected numbers.

The shared case (boxes abs xyxy, classes, scores; docs/tta.md):
  A = [0, 0, 10, 10]  class 0  0.9     IoU(A, B) = 90/110 = 0.8182
  B = [1, 0, 11, 10]  class 0  0.6     IoU(A, E) = 100/120 = 0.8333
  C = [20, 20, 30, 30] class 0 0.5     disjoint from the rest
  D = [0, 0, 10, 10]  class 1  0.3     A's box, another class: never merged with A
  E = [0, 0, 10, 12]  class 0  0.2
"""
import pytest
import torch

from diffusiondet.modeling.tta_merge import (
    in_scale_range,
    merge_detections,
    nms_merge,
    soft_vote_merge,
    wbf_merge,
)

A, B, C, D, E = [0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 10, 12]
BOXES = torch.tensor([A, B, C, D, E], dtype=torch.float32)
SCORES = torch.tensor([0.9, 0.6, 0.5, 0.3, 0.2])
CLASSES = torch.tensor([0, 0, 0, 1, 0])
# Score-weighted mean of A, B, E (weights 0.9, 0.6, 0.2; sum 1.7).
FUSED_ABE = [0.6 / 1.7, 0.0, 17.6 / 1.7, 17.4 / 1.7]


def close(actual, expected):
    return torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_nms_keeps_the_best_box_of_each_class_cluster():
    merged = nms_merge(BOXES, SCORES, CLASSES, iou_threshold=0.5)
    assert merged.source.tolist() == [0, 2, 3]  # B and E suppressed by A; D is another class
    assert close(merged.boxes, [A, C, D]) and close(merged.scores, [0.9, 0.5, 0.3])
    assert merged.classes.tolist() == [0, 0, 1]


def test_soft_vote_fuses_the_cluster_and_keeps_decayed_members_above_0_05():
    merged = soft_vote_merge(BOXES, SCORES, CLASSES)
    # Fused A+B+E scored with A's 0.9; C alone; D alone (class 1); B kept with 0.6 * (1 - 90/110)
    # = 0.10909 >= 0.05; E's 0.2 * (1 - 100/120) = 0.0333 and A's 0.9 * (1 - 1) are dropped.
    assert close(merged.boxes, [FUSED_ABE, C, D, B])
    assert close(merged.scores, [0.9, 0.5, 0.3, 0.6 * 20 / 110])
    assert merged.classes.tolist() == [0, 0, 1, 0]
    assert merged.source.tolist() == [0, 2, 3, 1]


def test_soft_vote_clusters_at_iou_0_65_inclusive_to_the_top_box():
    # IoU([0,0,13,1], [0,0,x,1]) = 13/x: x = 20 gives 0.65 exactly (in float32 too: a member),
    # x = 20.01 a hair less (its own cluster). Joining moves the top box's x2 to the mean 16.5.
    for x2, joins in ((20.0, True), (20.01, False)):
        boxes = torch.tensor([[0, 0, 13, 1], [0, 0, x2, 1]])
        merged = soft_vote_merge(boxes, torch.tensor([0.8, 0.8]), torch.tensor([2, 2]))
        assert (merged.boxes[0, 2].item() == pytest.approx((13 + x2) / 2)) == joins
        # Joined: fused box + the member decayed to 0.8 * 0.35 = 0.28; apart: both boxes as they are.
        expected = [0.8, 0.8 * 0.35] if joins else [0.8, 0.8]
        assert close(merged.scores, expected)


def test_wbf_fuses_by_iou_to_the_fused_box_and_weights_by_views():
    merged = wbf_merge(BOXES, SCORES, CLASSES, num_views=2)
    # Cluster {A, B, E}: mean score 1.7/3 times min(3, 2)/2; C: 0.5 * 1/2; D: 0.3 * 1/2.
    assert close(merged.boxes, [FUSED_ABE, C, D])
    assert close(merged.scores, [1.7 / 3, 0.25, 0.15])
    assert merged.classes.tolist() == [0, 0, 1] and merged.source.tolist() == [0, 2, 3]


def test_wbf_compares_with_the_fused_box_not_the_first_member():
    # P and Q fuse to [1, 0, 11, 10]; R has IoU 65/135 = 0.48 with P (no join to P alone) but
    # 75/125 = 0.60 > 0.55 with the fused box, so it joins: fused = (0.5P + 0.5Q + 0.4R) / 1.4.
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [3.5, 0, 13.5, 10]])
    merged = wbf_merge(boxes, torch.tensor([0.5, 0.5, 0.4]), torch.tensor([0, 0, 0]), num_views=4)
    assert close(merged.boxes, [[2.4 / 1.4, 0, 16.4 / 1.4, 10]])
    assert close(merged.scores, [(1.4 / 3) * 3 / 4])


def test_masks_follow_their_boxes_through_every_merge():
    # Mask i is all zero but for a pixel at column i: a merged row's mask names its source row.
    masks = torch.zeros(5, 3, 7, dtype=torch.bool)
    masks[torch.arange(5), 1, torch.arange(5)] = True
    for method, sources in (("nms", [0, 2, 3]), ("soft_vote", [0, 2, 3, 1]), ("wbf", [0, 2, 3])):
        merged, merged_masks = merge_detections(BOXES, SCORES, CLASSES, method, num_views=2, masks=masks)
        assert merged.source.tolist() == sources
        assert merged_masks[:, 1].float().argmax(dim=1).tolist() == sources, method


def test_no_detections_merge_to_no_detections():
    for method in ("nms", "soft_vote", "wbf"):
        merged, masks = merge_detections(
            torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), method,
            masks=torch.zeros(0, 5, 6, dtype=torch.bool),
        )  # fmt: skip
        assert merged.boxes.shape == (0, 4) and masks.shape == (0, 5, 6)


def test_unknown_merge_is_an_error():
    with pytest.raises(ValueError, match="soft_vote"):
        merge_detections(BOXES, SCORES, CLASSES, "vote")


def test_scale_range_is_sqrt_area_with_inclusive_ends():
    # sqrt(area): 4 (4x4), 8 (4x16), 16 (32x8), 24 (24x24); range [8, 16] keeps the middle two.
    boxes = torch.tensor([[0, 0, 4, 4], [10, 10, 14, 26], [0, 0, 32, 8], [5, 5, 29, 29]], dtype=torch.float32)
    assert in_scale_range(boxes, 8, 16).tolist() == [False, True, True, False]
    assert in_scale_range(boxes, 0, 10000).all()
