"""DDIMBoxSampler with a toy deterministic denoiser (no network)."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from diffusiondet.diffusion import (
    RandomSource,
    ReplayRandom,
    TorchRandom,
    boxes_to_signal,
    cosine_beta_schedule,
    diffusion_buffers,
    signal_to_boxes,
)
from diffusiondet.modeling.sampler import DDIMBoxSampler

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


N, K = 12, 3
WHWH = torch.tensor([[128.0, 96.0, 128.0, 96.0], [112.0, 80.0, 112.0, 80.0]])


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


class ToyDenoiser:
    """Per-image deterministic: boxes pulled towards an anchor, scores from the box centres.

    Extras: "filters" (B, N, 5) = [pred box, t] so alignment and the calling step are visible.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, boxes, t):
        self.calls.append((boxes.clone(), t.clone()))
        anchor = torch.tensor([20.0, 10.0, 60.0, 50.0])
        pred = 0.5 * boxes + 0.5 * anchor
        centre = (pred[..., :2] + pred[..., 2:]) / 2  # (B, N, 2)
        phase = torch.arange(K, dtype=torch.float32)
        logits = 3.0 * torch.sin(centre[..., :1] * 0.37 + centre[..., 1:] * 0.11 + phase)
        filters = torch.cat([pred, t[:, None, None].float().expand(*pred.shape[:2], 1)], -1)
        return {"pred_logits": logits, "pred_boxes": pred, "filters": filters}


def _per_image_sources(seeds):
    return [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]


class RecordingRandom(TorchRandom):
    def __init__(self, seed):
        super().__init__(generator=torch.Generator().manual_seed(seed))
        self.draws = []

    def randn(self, shape):
        value = super().randn(shape)
        self.draws.append(("randn", value))
        return value


@pytest.mark.parametrize(
    "steps, ensemble, expected_ts",
    [
        (1, "official", [999]),
        (2, "official", [999]),
        (4, "official", [999, 749, 499]),
        (1, "all_steps", [999]),
        (4, "all_steps", [999, 749, 499, 249]),
    ],
)
def test_candidate_counts_follow_ensemble_rule(alphas_cumprod, steps, ensemble, expected_ts):
    sampler = DDIMBoxSampler(steps=steps, ensemble=ensemble, use_nms=False)
    denoiser = ToyDenoiser()
    out = sampler(denoiser, alphas_cumprod, WHWH, N, per_image_rng=_per_image_sources([1, 2]))
    assert len(denoiser.calls) == steps
    for det in out:
        assert det["boxes"].shape == (len(expected_ts) * N, 4)
        calls = det["filters"][:, 4].long()
        assert [int((calls == t).sum()) for t in expected_ts] == [N] * len(expected_ts)


def test_batch_equals_each_image_alone(alphas_cumprod):
    sampler = DDIMBoxSampler(steps=4, detections_per_image=8)
    sources = _per_image_sources([5, 6])
    batched = sampler(ToyDenoiser(), alphas_cumprod, WHWH, N, per_image_rng=sources)
    for b, seed in enumerate([5, 6]):
        source = _per_image_sources([seed])
        alone = sampler(ToyDenoiser(), alphas_cumprod, WHWH[b : b + 1], N, per_image_rng=source)[0]
        assert batched[b].keys() == alone.keys() == {"boxes", "scores", "classes", "filters"}
        for key in alone:
            torch.testing.assert_close(batched[b][key], alone[key])
        assert alone["scores"].shape[0] <= 8


def test_draw_consumption_and_replay(alphas_cumprod):
    steps = 4
    sampler = DDIMBoxSampler(steps=steps)
    sources = [RecordingRandom(11), RecordingRandom(12)]
    recorded_run = sampler(ToyDenoiser(), alphas_cumprod, WHWH, N, per_image_rng=sources)
    for source in sources:
        assert len(source.draws) == 1 + (steps - 1) * 2
        sizes = [value.shape[0] for _, value in source.draws]
        assert sizes[0] == N
        assert all(sizes[i] + sizes[i + 1] == N for i in range(1, len(sizes), 2))
    # Renewal actually dropped something, otherwise this test would not exercise it.
    assert any(value.shape[0] not in (0, N) for s in sources for _, value in s.draws[1:])
    replays = [ReplayRandom(source.draws) for source in sources]
    replayed = sampler(ToyDenoiser(), alphas_cumprod, WHWH, N, per_image_rng=replays)
    assert [r.remaining for r in replays] == [0, 0]
    for b in range(2):
        for key in recorded_run[b]:
            torch.testing.assert_close(replayed[b][key], recorded_run[b][key])


def test_official_style_batch1_replay_shapes(alphas_cumprod):
    # The official recording stores x_T as (1, N, 4); a shared ReplayRandom reshapes it.
    x_T = torch.randn(1, N, 4)
    denoiser = ToyDenoiser()
    rng = ReplayRandom([("randn", x_T)])
    DDIMBoxSampler(steps=1)(denoiser, alphas_cumprod, WHWH[:1], N, rng=rng)
    assert rng.remaining == 0
    torch.testing.assert_close(denoiser.calls[0][0], signal_to_boxes(x_T, WHWH[:1], 2.0))
    assert denoiser.calls[0][1].dtype == torch.long and denoiser.calls[0][1].tolist() == [999]


def test_second_call_input_follows_ddim(alphas_cumprod):
    # x_T beyond ±scale: x̂_0 is clamped but ε̂ must use the UNclamped x.
    x_T = torch.randn(1, N, 4) * 3
    ddim_noise, refill = torch.randn(N, 4), torch.zeros(0, 4)
    sampler = DDIMBoxSampler(steps=2, box_renewal=False)
    denoiser = ToyDenoiser()
    sampler(denoiser, alphas_cumprod, WHWH[:1], N, rng=ReplayRandom([x_T, ddim_noise, refill]))
    a_t, a_n = alphas_cumprod[999].item(), alphas_cumprod[499].item()
    pred = denoiser(signal_to_boxes(x_T, WHWH[:1], 2.0), torch.tensor([999]))["pred_boxes"]
    x0 = boxes_to_signal(pred, WHWH[:1], 2.0).clamp(-2.0, 2.0).double()
    eps = (math.sqrt(1 / a_t) * x_T.double() - x0) / math.sqrt(1 / a_t - 1)
    sigma = math.sqrt((1 - a_t / a_n) * (1 - a_n) / (1 - a_t))
    x_next = math.sqrt(a_n) * x0 + math.sqrt(1 - a_n - sigma**2) * eps + sigma * ddim_noise.double()
    second_boxes, second_t = denoiser.calls[1]
    assert second_t.tolist() == [499]
    torch.testing.assert_close(
        second_boxes, signal_to_boxes(x_next.float(), WHWH[:1], 2.0), rtol=0, atol=1e-4
    )


def test_outputs_nms_sorted_and_extras_aligned(alphas_cumprod):
    # Three ensembled calls: the merged candidates are three score-sorted runs one after the
    # other, with many overlapping same-class boxes (the toy boxes all drift towards one anchor).
    sampler = DDIMBoxSampler(steps=3, ensemble="all_steps", nms_threshold=0.5)
    out = sampler(ToyDenoiser(), alphas_cumprod, WHWH, N, per_image_rng=_per_image_sources([3, 4]))
    for det in out:
        assert det["classes"].dtype == torch.long
        assert set(det["classes"].tolist()) <= set(range(K))
        assert 0 < len(det["scores"]) < 3 * N  # NMS removed something
        scores = det["scores"]
        assert torch.all(scores[:-1] >= scores[1:])
        # No two surviving boxes of one class overlap by more than the NMS threshold.
        iou = box_iou(det["boxes"], det["boxes"])
        same_class = det["classes"][:, None] == det["classes"][None, :]
        off_diagonal = ~torch.eye(len(scores), dtype=torch.bool)
        assert not (iou[same_class & off_diagonal] > 0.5).any()
        torch.testing.assert_close(det["filters"][:, :4], det["boxes"])
        assert "stacked" not in det


class DuplicatingDenoiser:
    """Ignores its input boxes: the same four proposals every call, every image.

    Proposal 0: box A, class 0, logit 3; proposal 1: A shifted by 2 px (IoU 0.905 with A),
    class 0, logit 2; proposal 2: A shifted by 1 px, class 1, logit 1; proposal 3: a box B far
    from A, class 0, logit 0.5. All other logits are -4. Calls after the first score 0.25 lower.
    """

    BOXES = torch.tensor(
        [[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [11.0, 11.0, 51.0, 51.0],
         [60.0, 20.0, 90.0, 40.0]]
    )
    LOGITS = torch.tensor([[3.0, -4.0], [2.0, -4.0], [-4.0, 1.0], [0.5, -4.0]])

    def __call__(self, boxes, t):
        batch = boxes.shape[0]
        later = (t < 999).float()[:, None, None]  # (B, 1, 1)
        logits = self.LOGITS.expand(batch, 4, 2) - 0.25 * later
        pred = self.BOXES.expand(batch, 4, 4).clone()
        step = t[:, None, None].float().expand(batch, 4, 1)
        return {"pred_logits": logits, "pred_boxes": pred, "call_t": step}


def test_nms_removes_duplicates_across_ensembled_calls(alphas_cumprod):
    # Two ensembled calls give 2 x 4 candidates (top-4 of the 4 x 2 (proposal, class) pairs each):
    # [A/0 3, A'/0 2, A''/1 1, B/0 .5] then the same at logits - 0.25. Class-aware NMS at IoU 0.5
    # keeps A (suppressing A' and every second-call duplicate), A'' (other class) and B, in
    # score order. Without NMS all 8 rows would remain, unsorted.
    sampler = DDIMBoxSampler(steps=2, ensemble="all_steps", nms_threshold=0.5)
    boxes = DuplicatingDenoiser.BOXES
    sources = _per_image_sources([7, 8])
    out = sampler(DuplicatingDenoiser(), alphas_cumprod, WHWH, 4, per_image_rng=sources)
    for det in out:
        torch.testing.assert_close(det["boxes"], boxes[[0, 2, 3]])
        assert det["classes"].tolist() == [0, 1, 0]
        torch.testing.assert_close(det["scores"], torch.sigmoid(torch.tensor([3.0, 1.0, 0.5])))
        assert det["call_t"][:, 0].tolist() == [999, 999, 999]  # the first call's rows won


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": 0}, {"steps": 2, "ensemble": "last"}, {"steps": 1, "renewal_threshold": 1.5},
     {"steps": 1, "nms_threshold": -0.1}, {"steps": 1, "detections_per_image": -1},
     {"steps": 1, "eta": -1.0}, {"steps": 1, "snr_scale": 0.0}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        DDIMBoxSampler(**kwargs)


def test_per_image_rng_length_checked(alphas_cumprod):
    with pytest.raises(ValueError):
        DDIMBoxSampler(steps=1)(
            ToyDenoiser(), alphas_cumprod, WHWH, N, per_image_rng=_per_image_sources([1])
        )


def test_outputs_that_are_not_per_proposal_are_refused(alphas_cumprod):
    # A per-image map, e.g. (B, 8, H, W), must not be gathered per proposal by accident (with
    # N = 8 its leading dims would even look right for another B): the sampler refuses it.
    def denoise(boxes, t):
        out = ToyDenoiser()(boxes, t)
        return {**out, "mask_feat": torch.zeros(boxes.shape[0], 8, 6, 6)}

    with pytest.raises(ValueError, match="mask_feat"):
        DDIMBoxSampler(steps=1)(denoise, alphas_cumprod, WHWH, N)


# --- working dtype, default random source, edge schedules, defaults and messages -----------
# A fixed denoiser (same float32 predictions every call, no network): the dtype checks are
# exact, no float tolerances.
# Each test below calls everything it checks itself (no module fixture): mutmut credits a
# function only to the tests that call it, and a module fixture runs inside the first test of
# the module only.

FIXED_N = 5
ONE_IMAGE_WHWH = torch.tensor([[80.0, 64.0, 80.0, 64.0]])


def _alphas_cumprod(num_timesteps=1000):
    return diffusion_buffers(cosine_beta_schedule(num_timesteps))["alphas_cumprod"]


class FixedDenoiser:
    """Same float32 predictions every call; records the boxes and timesteps it is given."""

    def __init__(self, batch=1):
        g = torch.Generator().manual_seed(3)
        self.logits = torch.randn(batch, FIXED_N, 3, generator=g) * 3
        xy = torch.rand(batch, FIXED_N, 2, generator=g) * 40
        self.boxes = torch.cat([xy, xy + 5 + torch.rand(batch, FIXED_N, 2, generator=g) * 20], -1)
        self.quality = torch.rand(batch, FIXED_N, generator=g)  # a (B, N) extra field
        self.calls = []

    def __call__(self, boxes, t):
        self.calls.append((boxes.clone(), t.clone()))
        return {"pred_logits": self.logits, "pred_boxes": self.boxes, "quality": self.quality}


def test_sampling_runs_in_the_dtype_of_the_image_sizes():
    denoise = FixedDenoiser()
    rng = TorchRandom(generator=torch.Generator().manual_seed(0))  # float32 draws
    sampler = DDIMBoxSampler(steps=3, box_renewal=False)
    sampler(denoise, _alphas_cumprod(), ONE_IMAGE_WHWH.double(), FIXED_N, rng=rng)
    assert [boxes.dtype for boxes, _ in denoise.calls] == [torch.float64] * 3
    assert [t.dtype for _, t in denoise.calls] == [torch.long] * 3


def test_default_random_source_draws_in_the_image_size_dtype():
    torch.manual_seed(7)
    x_T = torch.randn(FIXED_N, 4, dtype=torch.float64)
    denoise = FixedDenoiser()
    torch.manual_seed(7)
    DDIMBoxSampler(steps=1)(denoise, _alphas_cumprod(), ONE_IMAGE_WHWH.double(), FIXED_N)
    expected = signal_to_boxes(x_T[None], ONE_IMAGE_WHWH.double(), 2.0)
    assert torch.equal(denoise.calls[0][0], expected)


def test_integer_image_sizes_sample_in_float32():
    denoise = FixedDenoiser()
    DDIMBoxSampler(steps=2)(denoise, _alphas_cumprod(), ONE_IMAGE_WHWH.long(), FIXED_N)
    assert [boxes.dtype for boxes, _ in denoise.calls] == [torch.float32] * 2


def test_a_schedule_stepping_to_t0_makes_every_call():
    # T = S = 10: the pairs end (1, 0), (0, -1); the call at t = 1 is not the last one.
    denoise = FixedDenoiser()
    sampler = DDIMBoxSampler(steps=10, use_nms=False)
    (det,) = sampler(denoise, _alphas_cumprod(10), ONE_IMAGE_WHWH, FIXED_N, rng=TorchRandom())
    assert [int(t) for _, t in denoise.calls] == list(range(9, -1, -1))
    assert len(det["scores"]) == 9 * FIXED_N  # official ensemble: every call but the last


def test_per_proposal_scalar_extras_are_carried_into_the_detections():
    denoise = FixedDenoiser()
    (det,) = DDIMBoxSampler(steps=1, use_nms=False)(
        denoise, _alphas_cumprod(), ONE_IMAGE_WHWH, FIXED_N, rng=TorchRandom()
    )
    assert det["quality"].shape == det["scores"].shape
    # Each candidate carries its proposal's value (candidates are (proposal, class) pairs).
    assert set(det["quality"].tolist()) <= set(denoise.quality[0].tolist())


def test_per_image_sources_must_match_the_batch_with_a_clear_message():
    with pytest.raises(ValueError, match=r"^per_image_rng has 1 sources for 2 images$"):
        DDIMBoxSampler(steps=1)(
            FixedDenoiser(2), _alphas_cumprod(), ONE_IMAGE_WHWH.expand(2, 4), FIXED_N,
            per_image_rng=[TorchRandom()],
        )


def test_sampler_defaults_are_the_official_settings():
    s = DDIMBoxSampler(steps=1)
    assert (s.eta, s.snr_scale, s.box_renewal, s.renewal_threshold) == (1.0, 2.0, True, 0.5)
    assert (s.ensemble, s.use_focal, s.use_nms, s.nms_threshold) == ("official", True, True, 0.5)
    assert (s.detections_per_image, s.skip_unused_calls) == (0, False)


@pytest.mark.parametrize(
    "kwargs",
    [dict(eta=0.0), dict(snr_scale=0.5), dict(renewal_threshold=0.0), dict(renewal_threshold=1.0),
     dict(nms_threshold=0.0), dict(nms_threshold=1.0)],
)
def test_boundary_settings_are_accepted(kwargs):
    DDIMBoxSampler(steps=1, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), r"^steps must be an integer >= 1, got 0$"),
        (dict(eta=-0.5), r"^eta must be >= 0, got -0.5$"),
        (dict(snr_scale=0.0), r"^snr_scale must be > 0, got 0.0$"),
        (dict(renewal_threshold=1.5), r"^renewal_threshold must be in \[0, 1\], got 1.5$"),
        (dict(ensemble="mean"), r"^ensemble must be one of \('official', 'all_steps'\), got 'mean'$"),
        (dict(nms_threshold=1.5), r"^nms_threshold must be in \[0, 1\], got 1.5$"),
        (dict(detections_per_image=-1), r"^detections_per_image must be >= 0, got -1$"),
    ],
)
def test_invalid_settings_are_refused_with_their_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDIMBoxSampler(**{"steps": 1, **kwargs})


# --- softmax path --------------------------------------------------------------------------


class ShapeRecordingRandom(RandomSource):
    def __init__(self):
        self.shapes = []

    def randn(self, shape):
        self.shapes.append(tuple(shape))
        return torch.zeros(tuple(shape))


def test_softmax_renewal_keeps_proposals_by_their_best_foreground_probability():
    # 3 proposals sure of class 0, one of class 1, two of the background (last logit).
    logits = torch.tensor([[[5.0, 0, 0]] * 3 + [[0, 5.0, 0]] + [[0, 0, 5.0]] * 2])
    boxes = torch.tensor([[[10.0, 10.0, 30.0, 30.0]] * 6])

    def denoise(x, t):
        return {"pred_logits": logits, "pred_boxes": boxes}

    rng = ShapeRecordingRandom()
    sampler = DDIMBoxSampler(steps=2, use_focal=False, renewal_threshold=0.5)
    alphas_cumprod = diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]
    sampler(denoise, alphas_cumprod, torch.tensor([[80.0, 64.0, 80.0, 64.0]]), 6, rng=rng)
    # x_T, then the DDIM noise of the 4 kept proposals and the refill of the 2 others.
    assert rng.shapes == [(6, 4), (4, 4), (2, 4)]
