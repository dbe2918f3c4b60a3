"""DDIMBoxSampler and post-processing details the other tests leave open (found by mutation
testing): the working dtype follows the image sizes, the default random source, a schedule whose
last pair steps to t = 0, (B, N) extra fields, capping to one detection, error texts, defaults.

The denoiser is a fixed function (no network); dtype checks are exact, no float tolerances.
"""
import pytest
import torch

from diffusiondet.diffusion import TorchRandom, cosine_beta_schedule, diffusion_buffers, signal_to_boxes
from diffusiondet.modeling.postprocess import cap_detections, merge_candidates
from diffusiondet.modeling.sampler import DDIMBoxSampler

N = 5
WHWH = torch.tensor([[80.0, 64.0, 80.0, 64.0]])


def _alphas_cumprod(num_timesteps=1000):
    return diffusion_buffers(cosine_beta_schedule(num_timesteps))["alphas_cumprod"]


class FixedDenoiser:
    """Same float32 predictions every call; records the boxes and timesteps it is given."""

    def __init__(self, batch=1):
        g = torch.Generator().manual_seed(3)
        self.logits = torch.randn(batch, N, 3, generator=g) * 3
        xy = torch.rand(batch, N, 2, generator=g) * 40
        self.boxes = torch.cat([xy, xy + 5 + torch.rand(batch, N, 2, generator=g) * 20], -1)
        self.quality = torch.rand(batch, N, generator=g)  # a (B, N) extra field
        self.calls = []

    def __call__(self, boxes, t):
        self.calls.append((boxes.clone(), t.clone()))
        return {"pred_logits": self.logits, "pred_boxes": self.boxes, "quality": self.quality}


def test_sampling_runs_in_the_dtype_of_the_image_sizes():
    denoise = FixedDenoiser()
    rng = TorchRandom(generator=torch.Generator().manual_seed(0))  # float32 draws
    sampler = DDIMBoxSampler(steps=3, box_renewal=False)
    sampler(denoise, _alphas_cumprod(), WHWH.double(), N, rng=rng)
    assert [boxes.dtype for boxes, _ in denoise.calls] == [torch.float64] * 3
    assert [t.dtype for _, t in denoise.calls] == [torch.long] * 3


def test_default_random_source_draws_in_the_image_size_dtype():
    torch.manual_seed(7)
    x_T = torch.randn(N, 4, dtype=torch.float64)
    denoise = FixedDenoiser()
    torch.manual_seed(7)
    DDIMBoxSampler(steps=1)(denoise, _alphas_cumprod(), WHWH.double(), N)
    expected = signal_to_boxes(x_T[None], WHWH.double(), 2.0)
    assert torch.equal(denoise.calls[0][0], expected)


def test_integer_image_sizes_sample_in_float32():
    denoise = FixedDenoiser()
    DDIMBoxSampler(steps=2)(denoise, _alphas_cumprod(), WHWH.long(), N)
    assert [boxes.dtype for boxes, _ in denoise.calls] == [torch.float32] * 2


def test_a_schedule_stepping_to_t0_makes_every_call():
    # T = S = 10: the pairs end (1, 0), (0, -1); the call at t = 1 is not the last one.
    denoise = FixedDenoiser()
    sampler = DDIMBoxSampler(steps=10, use_nms=False)
    (det,) = sampler(denoise, _alphas_cumprod(10), WHWH, N, rng=TorchRandom())
    assert [int(t) for _, t in denoise.calls] == list(range(9, -1, -1))
    assert len(det["scores"]) == 9 * N  # official ensemble: every call but the last


def test_per_proposal_scalar_extras_are_carried_into_the_detections():
    denoise = FixedDenoiser()
    (det,) = DDIMBoxSampler(steps=1, use_nms=False)(
        denoise, _alphas_cumprod(), WHWH, N, rng=TorchRandom()
    )
    assert det["quality"].shape == det["scores"].shape
    # Each candidate carries its proposal's value (candidates are (proposal, class) pairs).
    assert set(det["quality"].tolist()) <= set(denoise.quality[0].tolist())


def test_per_image_sources_must_match_the_batch_with_a_clear_message():
    with pytest.raises(ValueError, match=r"^per_image_rng has 1 sources for 2 images$"):
        DDIMBoxSampler(steps=1)(
            FixedDenoiser(2), _alphas_cumprod(), WHWH.expand(2, 4), N, per_image_rng=[TorchRandom()]
        )


def test_sampler_defaults_are_the_official_settings():
    s = DDIMBoxSampler(steps=1)
    assert (s.eta, s.snr_scale, s.box_renewal, s.renewal_threshold) == (1.0, 2.0, True, 0.5)
    assert (s.ensemble, s.use_focal, s.use_nms, s.nms_threshold) == ("official", True, True, 0.5)
    assert (s.detections_per_image, s.skip_unused_calls) == (0, False)


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
