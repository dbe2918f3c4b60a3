"""Top-k candidate selection, merging, class-aware NMS and capping."""
import pytest
import torch

from diffusiondet.modeling.postprocess import (
    cap_detections,
    merge_candidates,
    nms_candidates,
    topk_candidates,
)


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


def test_topk_several_classes_per_proposal():
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 1, 2] = 3.0  # proposal 1 wins twice
    logits[0, 1, 0] = 2.0
    logits[0, 2, 3] = 1.0
    boxes = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    (cand,) = topk_candidates(logits, boxes, {}, num_keep=3, use_focal=True)
    assert cand["classes"].tolist() == [2, 0, 3]
    assert cand["classes"].dtype == torch.long
    torch.testing.assert_close(cand["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    torch.testing.assert_close(cand["boxes"], boxes[0, [1, 1, 2]])


def test_topk_batch_equals_single_images_and_extras_follow():
    logits, boxes = torch.randn(3, 7, 5), torch.rand(3, 7, 4) * 50
    extras = {"filters": torch.randn(3, 7, 2, 3), "proposal_id": torch.arange(7).expand(3, 7)}
    batched = topk_candidates(logits, boxes, extras, num_keep=7, use_focal=True)
    for b in range(3):
        one_extras = {k: v[b : b + 1] for k, v in extras.items()}
        alone = topk_candidates(logits[b : b + 1], boxes[b : b + 1], one_extras, 7, True)[0]
        for key in ("boxes", "scores", "classes", "filters", "proposal_id"):
            torch.testing.assert_close(batched[b][key], alone[key])
        cand = batched[b]
        proposal = cand["proposal_id"]
        torch.testing.assert_close(cand["boxes"], boxes[b, proposal])
        torch.testing.assert_close(cand["filters"], extras["filters"][b, proposal])
        chosen_logits = logits[b, proposal, cand["classes"]]
        torch.testing.assert_close(cand["scores"], torch.sigmoid(chosen_logits))
        # The selected entries are the 7 largest of the N*K probabilities.
        expected = torch.sigmoid(logits[b]).flatten().sort(descending=True).values[:7]
        torch.testing.assert_close(cand["scores"], expected)


def test_topk_softmax_path_ignores_background():
    logits = torch.tensor([[[0.0, 1.0, 5.0], [2.0, 0.0, -1.0]]])  # K = 2, last = background
    boxes = torch.rand(1, 2, 4)
    (cand,) = topk_candidates(logits, boxes, {}, num_keep=2, use_focal=False)
    probs = torch.softmax(logits[0], -1)
    assert cand["classes"].tolist() == [0, 1]
    torch.testing.assert_close(cand["scores"], torch.stack([probs[1, 0], probs[0, 1]]))
    torch.testing.assert_close(cand["boxes"], boxes[0, [1, 0]])


def test_merge_candidates():
    a = {"boxes": torch.rand(2, 4), "scores": torch.rand(2), "classes": torch.tensor([0, 1])}
    b = {"boxes": torch.rand(3, 4), "scores": torch.rand(3), "classes": torch.tensor([2, 2, 0])}
    merged = merge_candidates([a, b])
    assert merged["classes"].tolist() == [0, 1, 2, 2, 0]
    torch.testing.assert_close(merged["boxes"][2:], b["boxes"])
    with pytest.raises(ValueError):
        merge_candidates([])
    with pytest.raises(ValueError):
        merge_candidates([a, {"boxes": b["boxes"]}])


def test_nms_is_class_aware_and_keeps_extras_aligned():
    boxes = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 10, 10.5], [1, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32
    )
    cand = {
        "boxes": boxes,
        "scores": torch.tensor([0.6, 0.9, 0.8, 0.3]),
        "classes": torch.tensor([1, 1, 2, 1]),
        "tag": torch.tensor([10, 11, 12, 13]),
    }
    out = nms_candidates(cand, 0.5)
    # Box 0 is suppressed by box 1 (same class); box 2 overlaps both but has another class.
    assert out["tag"].tolist() == [11, 12, 13]
    torch.testing.assert_close(out["boxes"], boxes[[1, 2, 3]])
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)


def test_cap_detections():
    cand = {"scores": torch.tensor([0.2, 0.9, 0.5]), "tag": torch.tensor([0, 1, 2])}
    assert cap_detections(cand, 2)["tag"].tolist() == [1, 2]
    assert cap_detections(cand, 0) is cand
    assert cap_detections(cand, 10)["tag"].tolist() == [1, 2, 0]


# --- capping edge cases and merge errors (found by mutation testing) ---------------------


def test_capping_to_one_keeps_only_the_best():
    cand = {"scores": torch.tensor([0.2, 0.9, 0.5]), "classes": torch.tensor([0, 1, 2])}
    capped = cap_detections(cand, 1)
    assert capped["scores"].tolist() == [pytest.approx(0.9)] and capped["classes"].tolist() == [1]
    assert cap_detections(cand, 0) is cand


def test_merging_refuses_empty_or_mismatched_candidates_with_clear_messages():
    with pytest.raises(ValueError, match=r"^merge_candidates needs at least one candidate dict$"):
        merge_candidates([])
    a = {"scores": torch.zeros(1), "boxes": torch.zeros(1, 4)}
    with pytest.raises(ValueError, match=r"^candidate dicts have different fields: .* vs \{'scores'\}$"):
        merge_candidates([a, {"scores": torch.zeros(2)}])


def test_capping_keeps_tied_detections_in_their_original_order():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.9, 0.1] * 40)
    cand = {"scores": scores, "classes": torch.arange(240), "boxes": torch.zeros(240, 4)}
    capped = cap_detections(cand, 100)
    order = capped["classes"].tolist()
    assert order[:80] == [i for i in range(240) if i % 6 in (1, 4)]
    assert order[80:] == [i for i in range(240) if i % 6 in (0, 2, 3)][:20]
