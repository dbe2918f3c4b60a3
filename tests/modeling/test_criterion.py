"""Set criterion tests: official parity, key sets, empty / degenerate inputs, federated loss."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from diffusiondet.modeling.box_losses import order_box_corners
from diffusiondet.modeling.criterion import SetCriterion
from diffusiondet.modeling.matcher import DynamicKMatcher

from .test_matcher import fixture_targets, hand_target, random_boxes, random_target

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def make_criterion(num_classes=5, **kwargs):
    return SetCriterion(num_classes=num_classes, matcher=DynamicKMatcher(), **kwargs)


def fixture_outputs(parity):
    return {"pred_logits": parity["train_head_logits"], "pred_boxes": parity["train_head_boxes"]}


def random_outputs(num_stages, sizes, num_queries, num_classes, generator):
    """Stage-major head outputs (S, B, N, K) / (S, B, N, 4) that require grad."""
    logits = torch.randn(num_stages, len(sizes), num_queries, num_classes, generator=generator)
    boxes = torch.stack(
        [
            torch.stack([random_boxes(num_queries, w, h, generator) for (w, h) in sizes])
            for _ in range(num_stages)
        ]
    )
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def empty_target(width, height):
    return {
        "labels": torch.zeros(0, dtype=torch.long),
        "boxes_xyxy": torch.zeros(0, 4),
        "image_size_xyxy": torch.tensor([width, height, width, height], dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def parity_losses(parity):
    return make_criterion()(fixture_outputs(parity), fixture_targets(parity))


def test_parity_key_set(parity, parity_losses):
    assert set(parity_losses) == set(parity["train_losses_weighted"])
    assert len(parity_losses) == 18


ALL_KEYS = [name + suffix for suffix in ["", "_0", "_1", "_2", "_3", "_4"] for name in LOSS_NAMES]


@pytest.mark.parametrize("key", ALL_KEYS)
def test_parity_weighted_loss_terms(parity, parity_losses, key):
    want = parity["train_losses_weighted"][key]
    assert torch.allclose(parity_losses[key], want, rtol=1e-4, atol=0)


def test_match_all_stages_equals_fixture(parity):
    matches = make_criterion().match_all_stages(fixture_outputs(parity), fixture_targets(parity))
    assert len(matches) == 6
    for stage_matches, want_stage in zip(matches, parity["train_matches"]):
        for (fg_mask, matched_gt), (want_fg, want_gt) in zip(stage_matches, want_stage):
            assert torch.equal(fg_mask, want_fg) and torch.equal(matched_gt, want_gt)


def test_without_deep_supervision_only_final_stage(parity, parity_losses):
    criterion = make_criterion(deep_supervision=False)
    losses = criterion(fixture_outputs(parity), fixture_targets(parity))
    assert set(losses) == set(LOSS_NAMES)
    for key in LOSS_NAMES:
        assert torch.equal(losses[key], parity_losses[key])


def test_hand_computed_single_pair():
    # One query (0,0,10,10) and one GT (0,0,20,30) of class 1 in a 100 x 40 (w x h) image: the
    # query must match. The image is not square and the box offsets differ in x and y, so the L1
    # term tells (w, h) from (h, w); the logits are not 0, so the focal term tells α from 1 − α.
    x_neg, x_pos = 1.0, -0.5  # logits of class 0 (negative for this query) and class 1 (its GT)
    outputs = {
        "pred_logits": torch.tensor([[[[x_neg, x_pos]]]]),  # (S=1, B=1, N=1, K=2)
        "pred_boxes": torch.tensor([[[[0.0, 0.0, 10.0, 10.0]]]]),
    }
    target = {
        "labels": torch.tensor([1]),
        "boxes_xyxy": torch.tensor([[0.0, 0.0, 20.0, 30.0]]),
        "image_size_xyxy": torch.tensor([100.0, 40.0, 100.0, 40.0]),
    }
    losses = make_criterion(num_classes=2)(outputs, [target])
    # L1 on normalised xyxy: |10 - 20| / 100 + |10 - 30| / 40 = 0.6 ((h, w) would give 0.45).
    assert losses["loss_bbox"].item() == pytest.approx(5 * 0.6, rel=1e-5)
    # GIoU: intersection 100 = union 600 / 6, enclosing box = union.
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - 100 / 600), rel=1e-5)
    # Focal loss, α = 0.25, γ = 2: FL = -α (1 - p)^γ ln p for the positive class,
    # -(1 - α) p^γ ln(1 - p) for the negative one (p = sigmoid(logit)); divided by 1 positive.
    alpha, gamma = 0.25, 2.0
    p_pos, p_neg = 1 / (1 + math.exp(-x_pos)), 1 / (1 + math.exp(-x_neg))
    positive = -alpha * (1 - p_pos) ** gamma * math.log(p_pos)
    negative = -(1 - alpha) * p_neg**gamma * math.log(1 - p_neg)
    assert positive + negative == pytest.approx(0.62075413, rel=1e-6)  # α and 1 − α: 0.45853
    assert losses["loss_ce"].item() == pytest.approx(2 * (positive + negative), rel=1e-5)


def test_all_images_empty_gives_finite_connected_losses():
    generator = torch.Generator().manual_seed(10)
    sizes = [(64, 48), (80, 60)]
    outputs = random_outputs(6, sizes, 12, 4, generator)
    losses = make_criterion(num_classes=4)(outputs, [empty_target(w, h) for w, h in sizes])
    assert len(losses) == 18
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] == 0 and losses["loss_giou_3"] == 0
    assert losses["loss_ce"] > 0  # every query is a negative
    sum(losses.values()).backward()
    assert outputs["pred_boxes"].grad is not None and (outputs["pred_boxes"].grad == 0).all()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_mixed_empty_and_non_empty_images():
    generator = torch.Generator().manual_seed(11)
    sizes = [(64, 48), (80, 60)]
    outputs = random_outputs(6, sizes, 12, 4, generator)
    targets = [empty_target(*sizes[0]), random_target(3, 4, *sizes[1], generator)]
    losses = make_criterion(num_classes=4)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"] > 0 and losses["loss_giou"] > 0
    sum(losses.values()).backward()
    box_grad = outputs["pred_boxes"].grad
    assert (box_grad[:, 0] == 0).all()  # the empty image has no positives
    assert (box_grad[-1, 1] != 0).any()


def test_degenerate_predicted_boxes_stay_finite(parity):
    outputs = {k: v.clone() for k, v in fixture_outputs(parity).items()}
    targets = fixture_targets(parity)
    (fg_mask, _), _ = make_criterion().match_all_stages(outputs, targets)[0]
    positives = fg_mask.nonzero().squeeze(1)
    final_boxes = outputs["pred_boxes"][-1, 0]
    final_boxes[positives[0]] = final_boxes[positives[0], [2, 3, 0, 1]]  # inverted both ways
    final_boxes[positives[1], 2:] = final_boxes[positives[1], :2]  # zero area
    outputs["pred_boxes"].requires_grad_()
    losses = make_criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_giou"].backward()
    grad = outputs["pred_boxes"].grad[-1, 0]
    assert torch.isfinite(grad).all()
    assert (grad[positives[0]] != 0).any() and (grad[positives[1]] != 0).any()


def test_inverted_box_gets_the_giou_of_its_ordered_box():
    from diffusiondet.modeling.box_losses import giou_loss_sum

    gt = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    pred = torch.tensor([[20.0, 15.0, 60.0, 45.0]])
    assert torch.allclose(giou_loss_sum(pred[:, [2, 3, 0, 1]], gt), giou_loss_sum(pred, gt))
    # intersection 30 x 25 = 750, union 1200 + 1200 - 750 = 1650, enclosing box 50 x 35 = 1750
    want = 1 - (750 / 1650 - (1750 - 1650) / 1750)
    assert giou_loss_sum(pred, gt).item() == pytest.approx(want, rel=1e-5)


def test_state_dict_layout():
    assert len(make_criterion().state_dict()) == 0  # COCO checkpoints have no criterion keys
    weights = torch.arange(1.0, 8.0)
    fed = make_criterion(num_classes=7, use_fed_loss=True, fed_loss_cls_weights=weights)
    assert list(fed.state_dict()) == ["fed_loss_cls_weights"]
    assert torch.equal(fed.state_dict()["fed_loss_cls_weights"], weights)
    softmax = make_criterion(num_classes=7, use_focal=False)
    assert list(softmax.state_dict()) == ["empty_weight"]
    assert softmax.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])
    with pytest.raises(ValueError):
        make_criterion(num_classes=7, use_fed_loss=True, fed_loss_cls_weights=torch.ones(6))


def test_softmax_training_not_implemented(parity):
    outputs = {
        "pred_logits": torch.randn(6, 2, 50, 6),  # K + 1 logits
        "pred_boxes": parity["train_head_boxes"],
    }
    with pytest.raises(NotImplementedError):
        make_criterion(use_focal=False)(outputs, fixture_targets(parity))


def test_fed_loss_uses_at_most_fed_loss_num_classes():
    num_classes, fed_classes = 20, 6
    generator = torch.Generator().manual_seed(12)
    sizes = [(96, 128), (80, 112)]
    targets = [random_target(4, num_classes, w, h, generator) for w, h in sizes]
    weights = torch.rand(num_classes, generator=generator) + 0.1
    weights[15:] = 0.0  # never sampled as negatives
    criterion = make_criterion(
        num_classes,
        use_fed_loss=True,
        fed_loss_cls_weights=weights,
        fed_loss_num_classes=fed_classes,
    )
    outputs = random_outputs(1, sizes, 30, num_classes, generator)
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss_ce"].backward()
    class_has_grad = (outputs["pred_logits"].grad != 0).flatten(0, 2).any(0)  # (K,)
    active = set(class_has_grad.nonzero().flatten().tolist())
    (matches,) = criterion.match_all_stages(outputs, targets)
    matched_classes = {
        int(label) for t, (_, gt_idx) in zip(targets, matches) for label in t["labels"][gt_idx]
    }
    assert matched_classes <= active
    assert len(active) <= fed_classes
    assert all(c < 15 for c in active - matched_classes)

    full = make_criterion(num_classes)(outputs, targets)["loss_ce"]
    assert 0 < losses["loss_ce"] < full  # a masked subset of the same non-negative terms


def test_fed_loss_with_more_fed_classes_than_the_dataset_has():
    # FED_LOSS_NUM_CLASSES 50 (the default) on an 8-class dataset, one class never seen (weight
    # 0): every class that can be sampled is in the loss instead of a crash in the sampler.
    num_classes = 8
    generator = torch.Generator().manual_seed(5)
    sizes = [(96, 128), (80, 112)]
    targets = [random_target(3, num_classes - 1, w, h, generator) for w, h in sizes]
    weights = torch.ones(num_classes)
    weights[num_classes - 1] = 0.0
    criterion = make_criterion(
        num_classes, use_fed_loss=True, fed_loss_cls_weights=weights, fed_loss_num_classes=50
    )
    outputs = random_outputs(1, sizes, 30, num_classes, generator)
    losses = criterion(outputs, targets)
    losses["loss_ce"].backward()
    class_has_grad = (outputs["pred_logits"].grad != 0).flatten(0, 2).any(0)  # (K,)
    assert class_has_grad.tolist() == [True] * (num_classes - 1) + [False]
    full = make_criterion(num_classes)(outputs, targets)["loss_ce"]
    assert 0 < losses["loss_ce"] < full


def test_extra_loss_receives_the_same_matches(parity):
    seen = []

    class WithCount(SetCriterion):
        def get_loss_functions(self):
            return {**super().get_loss_functions(), "count": self.loss_count}

        def loss_count(self, outputs, targets, matches, num_pos):
            seen.append(matches)
            return {"loss_count": outputs["pred_boxes"].new_tensor(num_pos)}

    criterion = WithCount(num_classes=5, matcher=DynamicKMatcher())
    criterion.weight_dict["loss_count"] = 0.5
    losses = criterion(fixture_outputs(parity), fixture_targets(parity))
    assert len(losses) == 24 and "loss_count" in losses and "loss_count_4" in losses
    positives = [sum(int(fg.sum()) for fg, _ in stage) for stage in parity["train_matches"]]
    assert losses["loss_count"].item() == 0.5 * positives[0]
    assert losses["loss_count_2"].item() == 0.5 * positives[3]
    for got, want in zip(seen, parity["train_matches"]):
        assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want))


# --- corner ordering, normalisation by the positives, federated variants, defaults -------
# Costs and losses below are compared with formulas written out here in float64, to 1e-6
# relative.


def test_corner_ordering_works_on_batched_boxes():
    boxes = torch.tensor([[[5.0, 8.0, 1.0, 2.0], [0.0, 0.0, 3.0, 4.0], [7.0, 1.0, 2.0, 9.0]]] * 2)
    want = torch.tensor([[[1.0, 2.0, 5.0, 8.0], [0.0, 0.0, 3.0, 4.0], [2.0, 1.0, 7.0, 9.0]]] * 2)
    assert torch.equal(order_box_corners(boxes), want)


def _two_image_batch():
    logits = torch.tensor(
        [[[1.0, -2.0, 0.5], [0.2, 0.1, -1.0]], [[-0.5, 2.0, 0.0], [0.3, -0.3, 1.5]]],
        dtype=torch.float64,
    )
    boxes = torch.tensor(
        [[[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 20.0, 20.0]], [[5.0, 5.0, 30.0, 60.0], [1.0, 2.0, 3.0, 4.0]]],
        dtype=torch.float64,
    )
    targets = [
        hand_target([0, 2], [[12.0, 8.0, 48.0, 44.0], [0.0, 0.0, 25.0, 15.0]]),
        hand_target([1], [[4.0, 6.0, 28.0, 55.0]], w=80.0, h=64.0),
    ]
    # Every query is positive (no background column), classes 0 and 1 only (2 stays unmatched).
    matches = [
        (torch.tensor([True, True]), torch.tensor([0, 0])),
        (torch.tensor([True, True]), torch.tensor([0, 0])),
    ]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, matches


def test_focal_loss_uses_all_class_columns_and_divides_by_the_positives():
    outputs, targets, matches = _two_image_batch()
    crit = SetCriterion(num_classes=3, matcher=DynamicKMatcher(), focal_alpha=0.3, focal_gamma=1.5)
    one_hot = torch.zeros(2, 2, 3, dtype=torch.float64)
    one_hot[0, :, 0] = 1.0
    one_hot[1, :, 1] = 1.0
    want = sigmoid_focal_loss(outputs["pred_logits"], one_hot, 0.3, 1.5, "sum") / 2.5
    got = crit.loss_labels(outputs, targets, matches, 2.5)["loss_ce"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_box_losses_divide_by_the_positives():
    outputs, targets, matches = _two_image_batch()
    crit = SetCriterion(num_classes=3, matcher=DynamicKMatcher())
    got = crit.loss_boxes(outputs, targets, matches, 4.0)
    pred = outputs["pred_boxes"].flatten(0, 1)
    gt = torch.tensor([[12.0, 8.0, 48.0, 44.0]] * 2 + [[4.0, 6.0, 28.0, 55.0]] * 2, dtype=torch.float64)
    size = torch.tensor([[200.0, 100.0, 200.0, 100.0]] * 2 + [[80.0, 64.0, 80.0, 64.0]] * 2, dtype=torch.float64)
    torch.testing.assert_close(got["loss_bbox"], (pred / size - gt / size).abs().sum() / 4.0)
    giou = torch.stack([1 - _giou(a, b) for a, b in zip(pred.tolist(), gt.tolist())]).sum() / 4.0
    torch.testing.assert_close(got["loss_giou"], giou.to(torch.float64), rtol=1e-6, atol=0)


def _giou(a, b):
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return torch.tensor(inter / union - (hull - union) / hull)


def test_federated_loss_without_focal_is_plain_bce():
    outputs, targets, matches = _two_image_batch()
    crit = SetCriterion(
        num_classes=3, matcher=DynamicKMatcher(), use_focal=False, use_fed_loss=True,
        fed_loss_num_classes=50,
    )
    one_hot = torch.zeros(2, 2, 3, dtype=torch.float64)
    one_hot[0, :, 0] = 1.0
    one_hot[1, :, 1] = 1.0
    bce = F.binary_cross_entropy_with_logits(outputs["pred_logits"], one_hot, reduction="sum")
    got = crit.loss_labels(outputs, targets, matches, 2.0)["loss_ce"]
    torch.testing.assert_close(got, bce / 2.0, rtol=1e-6, atol=0)


def test_federated_loss_never_keeps_classes_of_zero_weight():
    outputs, targets, matches = _two_image_batch()
    crit = SetCriterion(
        num_classes=3, matcher=DynamicKMatcher(), use_fed_loss=True, fed_loss_num_classes=50,
        fed_loss_cls_weights=torch.tensor([1.0, 1.0, 0.0]),
    )
    one_hot = torch.zeros(2, 2, 3, dtype=torch.float64)
    one_hot[0, :, 0] = 1.0
    one_hot[1, :, 1] = 1.0
    per_class = sigmoid_focal_loss(outputs["pred_logits"], one_hot, 0.25, 2.0, "none")
    want = per_class[..., :2].sum() / 2.0  # class 2: no GT in the batch and zero weight
    got = crit.loss_labels(outputs, targets, matches, 2.0)["loss_ce"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_softmax_training_is_refused_with_the_official_message():
    outputs, targets, matches = _two_image_batch()
    crit = SetCriterion(num_classes=3, matcher=DynamicKMatcher(), use_focal=False)
    message = (
        r"^softmax classification \(USE_FOCAL=False, USE_FED_LOSS=False\) is not implemented "
        r"for training, as in the official DiffusionDet$"
    )
    with pytest.raises(NotImplementedError, match=message):
        crit.loss_labels(outputs, targets, matches, 1.0)


class _CriterionWithExtraLoss(SetCriterion):
    """The documented extension point: one more loss reading a per-image output."""

    def get_loss_functions(self):
        fns = super().get_loss_functions()
        fns["extra"] = self.loss_extra
        return fns

    def loss_extra(self, outputs, targets, matches, num_pos):
        self.seen.append(outputs["per_image"]["note"])
        return {"loss_extra": outputs["pred_logits"].sum() * 0.0}


def test_subclass_losses_see_per_image_outputs_unsliced():
    crit = _CriterionWithExtraLoss(num_classes=3, matcher=DynamicKMatcher())
    crit.weight_dict["loss_extra"] = 1.0
    crit.seen = []
    assert list(crit.get_loss_functions()) == ["labels", "boxes", "extra"]
    outputs, targets, _ = _two_image_batch()
    staged = {k: torch.stack([v, v]) for k, v in outputs.items()}
    losses = crit(staged, targets, per_image={"note": "kept whole"})
    assert crit.seen == ["kept whole", "kept whole"]
    # Anything that is not stage-major is refused instead of being sliced by accident: an
    # (B, 8, H, W) map with B = S would otherwise be cut per stage.
    with pytest.raises(ValueError, match="stage-major"):
        crit({**staged, "mask_feat": torch.zeros(3, 8, 4, 4)}, targets)
    assert {"loss_extra", "loss_extra_0", "loss_ce_0", "loss_giou"} <= set(losses)
    assert not math.isnan(float(losses["loss_ce"]))


def test_matcher_and_criterion_defaults_are_the_official_values():
    m = DynamicKMatcher()
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (2.0, 5.0, 2.0)
    assert (m.use_focal, m.use_fed_loss, m.focal_alpha, m.focal_gamma) == (True, False, 0.25, 2.0)
    assert (m.ota_k, m.center_radius) == (5, 2.5)
    assert (m.not_in_both_cost, m.not_fg_cost, m.unmatched_gt_cost) == (100.0, 10000.0, 1e5)
    c = SetCriterion(num_classes=4, matcher=m)
    assert c.num_classes == 4 and c.matcher is m
    assert c.weight_dict == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert (c.deep_supervision, c.use_focal, c.use_fed_loss) == (True, True, False)
    assert (c.focal_alpha, c.focal_gamma, c.fed_loss_num_classes) == (0.25, 2.0, 50)


def test_federated_class_weights_default_to_uniform_and_are_shape_checked():
    crit = SetCriterion(num_classes=4, matcher=DynamicKMatcher(), use_fed_loss=True)
    assert torch.equal(crit.fed_loss_cls_weights, torch.ones(4))
    with pytest.raises(ValueError, match=r"^fed_loss_cls_weights must have shape \(4,\), got \(3,\)$"):
        SetCriterion(
            num_classes=4, matcher=DynamicKMatcher(), use_fed_loss=True,
            fed_loss_cls_weights=torch.ones(3),
        )
