"""Matcher, criterion and box-loss details the other tests leave open (found by mutation testing):
strict centre-prior edges, the three classification costs, per-GT dynamic k, the non-candidate
penalty, loss normalisation, the federated BCE variant and the loss extension point.

Costs and losses are compared with formulas written out here in float64, to 1e-6 relative.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from diffusiondet.modeling.box_losses import order_box_corners
from diffusiondet.modeling.criterion import SetCriterion
from diffusiondet.modeling.matcher import DynamicKMatcher

pytestmark = pytest.mark.numerics


def _target(labels, boxes, w=200.0, h=100.0):
    return {
        "labels": torch.tensor(labels),
        "boxes_xyxy": torch.tensor(boxes),
        "image_size_xyxy": torch.tensor([w, h, w, h]),
    }


# --- box helpers --------------------------------------------------------------------------------


def test_corner_ordering_works_on_batched_boxes():
    boxes = torch.tensor([[[5.0, 8.0, 1.0, 2.0], [0.0, 0.0, 3.0, 4.0], [7.0, 1.0, 2.0, 9.0]]] * 2)
    want = torch.tensor([[[1.0, 2.0, 5.0, 8.0], [0.0, 0.0, 3.0, 4.0], [2.0, 1.0, 7.0, 9.0]]] * 2)
    assert torch.equal(order_box_corners(boxes), want)


# --- matcher ------------------------------------------------------------------------------------


def test_centre_prior_is_strict_on_every_edge():
    # GT (10, 20)-(30, 60): centre (20, 40); radius 2.5 x (20, 40) -> centre region (-30, 70) x (-60, 140).
    gt = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    centres = [
        (20, 40),  # inside both
        (10, 40), (30, 40), (20, 20), (20, 60),  # on a box edge: near the centre, not in the box
        (-30, 40), (70, 40), (20, -60), (20, 140),  # on a centre-region edge: no candidate
        (-29, 40),  # just inside the centre region
    ]
    boxes = torch.tensor([[x - 1.0, y - 1.0, x + 1.0, y + 1.0] for x, y in centres])
    is_candidate, in_both = DynamicKMatcher().center_prior(boxes, gt)
    assert is_candidate.tolist() == [True] * 5 + [False] * 4 + [True]
    assert in_both[:, 0].tolist() == [True] + [False] * 9


def test_classification_costs_of_the_three_variants():
    p = torch.tensor([[1e-6, 0.3, 0.999999], [0.5, 0.9, 0.02]], dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    q = p[:, labels]

    def bce_form(pos_w, neg_w, gamma):
        pos = pos_w * (1 - q) ** gamma * -torch.log(q + 1e-8)
        neg = neg_w * q**gamma * -torch.log(1 - q + 1e-8)
        return pos - neg

    focal = DynamicKMatcher(focal_alpha=0.3, focal_gamma=1.5).class_cost(p, labels)
    torch.testing.assert_close(focal, bce_form(0.3, 0.7, 1.5), rtol=1e-6, atol=0)
    fed = DynamicKMatcher(use_focal=False, use_fed_loss=True).class_cost(p, labels)
    torch.testing.assert_close(fed, bce_form(1.0, 1.0, 0.0), rtol=1e-6, atol=0)
    softmax = DynamicKMatcher(use_focal=False).class_cost(p, labels)
    assert torch.equal(softmax, -q)


def test_softmax_matcher_normalises_over_the_classes_of_each_query():
    logits = torch.tensor([[[3.0, 3.0, 0.0], [2.0, 0.0, 0.0]]])
    probs = DynamicKMatcher(use_focal=False).class_probabilities(logits)
    torch.testing.assert_close(probs, logits.softmax(-1))
    # Same boxes: the query with the higher class-0 probability (the second) takes the GT.
    boxes = torch.tensor([[[40.0, 40.0, 60.0, 60.0], [40.0, 40.0, 60.0, 60.0]]])
    target = _target([0], [[30.0, 30.0, 80.0, 80.0]])
    (fg, gt), = DynamicKMatcher(use_focal=False, ota_k=1)(logits, boxes, [target])
    assert fg.tolist() == [False, True] and gt.tolist() == [0]


def test_non_candidates_keep_their_cost_order():
    # No query is near the GT: all pay not_fg_cost, and the closest one (the last) still wins.
    gt = [[10.0, 10.0, 12.0, 12.0]]
    boxes = torch.tensor([[150.0, 80.0, 160.0, 90.0], [120.0, 60.0, 130.0, 70.0], [60.0, 40.0, 70.0, 50.0]])
    fg, gt_index = DynamicKMatcher().match_image(torch.full((3, 3), 0.5), boxes, _target([0], gt))
    assert fg.tolist() == [False, False, True] and gt_index.tolist() == [0]


def test_each_gt_takes_exactly_its_own_dynamic_k():
    # ota_k = 2: GT 0's two best IoUs sum to 2 (k = 2), GT 1's to 1.5 (k = 1).
    cost = torch.tensor([[5.0, 3.0], [6.0, 5.0], [9.0, 6.0]])
    ious = torch.tensor([[1.0, 0.5], [1.0, 1.0], [0.5, 0.5]])
    assert DynamicKMatcher(ota_k=2).dynamic_k(ious).tolist() == [2, 1]
    fg, gt = DynamicKMatcher(ota_k=2).assign(cost, ious)
    # Query 0 is taken by both GTs and keeps its cheaper one (GT 1); query 2 by none.
    assert fg.tolist() == [True, True, False] and gt.tolist() == [1, 0]
    # A query taken by a single GT keeps it, even when another GT would be cheaper for it.
    cost = torch.tensor([[1.0, 0.5], [5.0, 0.1]])
    fg, gt = DynamicKMatcher(ota_k=1).assign(cost, torch.full((2, 2), 0.5))
    assert fg.tolist() == [True, True] and gt.tolist() == [0, 1]


# --- criterion ----------------------------------------------------------------------------------


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
        _target([0, 2], [[12.0, 8.0, 48.0, 44.0], [0.0, 0.0, 25.0, 15.0]]),
        _target([1], [[4.0, 6.0, 28.0, 55.0]], w=80.0, h=64.0),
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
