"""The dynamic-k matcher computes its costs in float32 whatever the input dtype (issue #12).

Under fp16 AMP the head's logits and boxes arrive in fp16: the ``1e-8`` inside the class cost's
logs rounds to 0 there, logits beyond about ±8 (positive) / ±17 (negative) make the class cost
±inf, and pixel boxes / the 1e5 re-matching penalty lose precision or overflow. The matches from
fp16 / bf16 inputs must equal those from the very same values in float32.
"""
import pytest
import torch

from diffusiondet.modeling.matcher import DynamicKMatcher

WIDTH, HEIGHT = 1000.0, 600.0  # non-square, abs pixels
NUM_QUERIES, NUM_GT, NUM_CLASSES = 120, 6, 5
LOW_PRECISION = [torch.float16, torch.bfloat16]


def make_inputs(seed, num_logits=NUM_CLASSES):
    """One image: GT boxes, queries jittered around them plus random ones, extreme logits.

    Returns (logits (1, N, num_logits), boxes (1, N, 4), target) in float32.
    """
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(NUM_GT, 2, generator=g) * torch.tensor([WIDTH * 0.7, HEIGHT * 0.7])
    wh = 30 + torch.rand(NUM_GT, 2, generator=g) * torch.tensor([WIDTH * 0.3, HEIGHT * 0.3])
    gt = torch.cat([xy, xy + wh], dim=1)  # up to ~1000 px
    near = gt[torch.randint(NUM_GT, (NUM_QUERIES // 2,), generator=g)]
    near = near + torch.randn(near.shape, generator=g) * 15.0
    xy = torch.rand(NUM_QUERIES - near.shape[0], 2, generator=g) * torch.tensor([WIDTH, HEIGHT])
    far = torch.cat([xy, xy + 5 + torch.rand(xy.shape, generator=g) * 300], dim=1)
    boxes = torch.cat([near, far])[None]
    # Logits of large magnitude: ±12 and ±20 (plus some jitter), where fp16 sigmoids saturate.
    magnitude = torch.tensor([12.0, 20.0])[torch.randint(2, (NUM_QUERIES, num_logits), generator=g)]
    sign = torch.randint(2, (NUM_QUERIES, num_logits), generator=g) * 2.0 - 1.0
    logits = (sign * (magnitude + torch.rand(NUM_QUERIES, num_logits, generator=g)))[None]
    target = {
        "labels": torch.randint(NUM_CLASSES, (NUM_GT,), generator=g),
        "boxes_xyxy": gt,
        "image_size_xyxy": torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT]),
    }
    return logits, boxes, target


def recording(matcher):
    """Make ``matcher.assign`` record the (cost, ious) it gets; returns the record list."""
    seen, assign = [], matcher.assign

    def record(cost, ious):
        seen.append((cost, ious))
        return assign(cost, ious)

    matcher.assign = record
    return seen


def assert_same_matches(got, want):
    assert len(got) == len(want)
    for (fg, gt), (want_fg, want_gt) in zip(got, want):
        assert torch.equal(fg, want_fg)
        assert torch.equal(gt, want_gt)


MATCHERS = {
    "focal": dict(),
    "fed_bce": dict(use_focal=False, use_fed_loss=True),
    "softmax": dict(use_focal=False),
}


@pytest.mark.parametrize("variant", list(MATCHERS))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_low_precision_inputs_match_like_their_fp32_values(dtype, variant, seed):
    num_logits = NUM_CLASSES + (variant == "softmax")
    logits, boxes, target = make_inputs(seed, num_logits)
    logits_lp, boxes_lp = logits.to(dtype), boxes.to(dtype)
    matcher = DynamicKMatcher(**MATCHERS[variant])
    seen = recording(matcher)
    got = matcher(logits_lp, boxes_lp, [target])
    # Reference: the same (rounded) values, in float32 from the start.
    want = DynamicKMatcher(**MATCHERS[variant])(logits_lp.float(), boxes_lp.float(), [target])
    assert_same_matches(got, want)
    assert got[0][0].any()
    ((cost, ious),) = seen
    assert cost.dtype == torch.float32 and ious.dtype == torch.float32
    assert torch.isfinite(cost).all() and torch.isfinite(ious).all()


def test_the_fp16_inputs_do_break_an_fp16_class_cost():
    """The test inputs exercise the hazard: computed in fp16, the class cost is not finite."""
    logits, _, target = make_inputs(0)
    probs16 = logits[0].half().sigmoid()
    cost16 = DynamicKMatcher().class_cost(probs16, target["labels"])
    assert not torch.isfinite(cost16).all()
    cost32 = DynamicKMatcher().class_cost(logits[0].half().float().sigmoid(), target["labels"])
    assert torch.isfinite(cost32).all()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_match_image_upcasts_probabilities_and_boxes(dtype):
    logits, boxes, target = make_inputs(2)
    probs = logits[0].sigmoid().to(dtype)
    matcher = DynamicKMatcher()
    seen = recording(matcher)
    got = matcher.match_image(probs, boxes[0].to(dtype), target)
    want = DynamicKMatcher().match_image(probs.float(), boxes[0].to(dtype).float(), target)
    assert_same_matches([got], [want])
    assert seen[0][0].dtype == torch.float32 and torch.isfinite(seen[0][0]).all()


def test_assign_upcasts_a_low_precision_cost():
    """Re-matching adds 1e5 to matched rows: beyond fp16's range (65504), every row would be inf."""
    # (N=3, G=4), IoUs 0 so k = 1: GT 0 and GT 2 both take query 1, which keeps GT 2; every
    # query is then matched, so GT 0's re-matching raises all rows. In float32 it picks query 1
    # again (its cheapest), which the stale-mask rule resets to GT 2: GT 0 stays unmatched. With
    # all rows at inf, argmin would pick query 0 and GT 0 would be reported instead of GT 1.
    cost = torch.tensor([[5.0, 0.0, 5.0, 5.0], [1.0, 5.0, 0.0, 5.0], [5.0, 5.0, 5.0, 0.0]])
    want = DynamicKMatcher().assign(cost, torch.zeros(3, 4))
    assert want[0].tolist() == [True, True, True] and want[1].tolist() == [1, 2, 3]
    for dtype in LOW_PRECISION:
        got = DynamicKMatcher().assign(cost.to(dtype), torch.zeros(3, 4, dtype=dtype))
        assert_same_matches([got], [want])


def test_float64_inputs_stay_float64():
    logits, boxes, target = make_inputs(3)
    target = dict(target, boxes_xyxy=target["boxes_xyxy"].double())
    matcher = DynamicKMatcher()
    seen = recording(matcher)
    got = matcher(logits.double(), boxes.double(), [target])
    want = DynamicKMatcher()(logits, boxes, [target])
    assert seen[0][0].dtype == torch.float64
    assert_same_matches(got, want)
