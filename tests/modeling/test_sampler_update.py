"""SAMPLER_UPDATE (paper Table 4c): "x0" feeds each call's predicted boxes to the next call.

A fixed fake denoiser makes the renewal decision known in advance (proposal scores depend only
on the proposal index), so the second call's input can be written down slot by slot: kept
proposals first (original order), then the refill draws. Images are non-square and the two
images of a batch keep different proposals.
"""
import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.diffusion import (
    ReplayRandom,
    boxes_to_signal,
    cosine_beta_schedule,
    diffusion_buffers,
    renew_and_step,
    signal_to_boxes,
)
from diffusiondet.diffusion.renewal import STEP_UPDATES
from diffusiondet.modeling.sampler import DDIMBoxSampler
from diffusiondet.options import SAMPLER_UPDATES

from ..utils import tiny_cfg

N, K = 8, 3
WHWH = torch.tensor([[128.0, 96.0, 128.0, 96.0], [112.0, 80.0, 112.0, 80.0]])
# Proposals scoring above the renewal threshold, per image (the rest are renewed).
KEPT = ([0, 2, 3, 7], [1, 6])


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


class IndexScoredDenoiser:
    """Deterministic: boxes shrink towards a per-proposal anchor; logit +3 for KEPT, else -3.

    Proposal 5's prediction lies far outside the image, so its x̂_0 is clamped to ±scale.
    Records every call's (input boxes, predicted boxes), both (B, N, 4) abs xyxy.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, boxes, t):
        batch = boxes.shape[0]
        idx = torch.arange(N, dtype=torch.float32)
        anchor = torch.stack([4 * idx, 3 * idx, 4 * idx + 30, 3 * idx + 25], dim=-1)  # (N, 4)
        anchor[5] = torch.tensor([-300.0, -200.0, 500.0, 400.0])
        pred = 0.25 * boxes + 0.75 * anchor
        logits = torch.full((batch, N, K), -3.0)
        for b, kept in enumerate(KEPT[:batch]):
            logits[b, kept, b % K] = 3.0
        self.calls.append((boxes.clone(), pred.clone()))
        return {"pred_logits": logits, "pred_boxes": pred}


def _clamped(pred, whwh, scale=2.0):
    """The boxes the sampler carries for a prediction: x̂_0 clamped to ±scale, back in pixels."""
    return signal_to_boxes(boxes_to_signal(pred, whwh, scale).clamp(-scale, scale), whwh, scale)


def _draws(seed, batch=2, steps=2, kept=KEPT):
    """Per-image replayed draws: x_T (N, 4), then per step DDIM noise (k, 4) and refill (N-k, 4)."""
    g = torch.Generator().manual_seed(seed)
    draws = []
    for b in range(batch):
        sizes = [len(kept[b]), N - len(kept[b])] * (steps - 1)
        x_T = torch.randn(N, 4, generator=g) * 3  # wide: some boxes start beyond ±scale
        draws.append([x_T] + [torch.randn(k, 4, generator=g) for k in sizes])
    return draws


def _run(update, alphas_cumprod, draws, steps=2, box_renewal=True):
    sampler = DDIMBoxSampler(steps=steps, box_renewal=box_renewal, update=update, use_nms=False)
    denoiser = IndexScoredDenoiser()
    sources = [ReplayRandom(list(d)) for d in draws]
    sampler(denoiser, alphas_cumprod, WHWH, N, per_image_rng=sources)
    assert [s.remaining for s in sources] == [0] * len(sources)  # same draw count in both modes
    return denoiser.calls


def test_x0_carries_kept_predictions_and_renews_the_rest_with_the_refill_draws(alphas_cumprod):
    draws = _draws(0)
    calls = _run("x0", alphas_cumprod, draws)
    (_, first_pred), (second_in, _) = calls
    for b, kept in enumerate(KEPT):
        k = len(kept)
        expected_kept = _clamped(first_pred[b, kept], WHWH[b : b + 1])
        torch.testing.assert_close(second_in[b, :k], expected_kept, rtol=0, atol=1e-4)
        refill = draws[b][2]  # draws[b][1] is the DDIM noise: drawn, unused
        torch.testing.assert_close(second_in[b, k:], signal_to_boxes(refill, WHWH[b : b + 1], 2.0))
    # Proposal 5 of image 0 is renewed; proposal 2 is kept and was predicted inside the image,
    # so there the clamp changes nothing and the input is the prediction itself.
    torch.testing.assert_close(second_in[0, 1], first_pred[0, 2], rtol=0, atol=1e-4)


def test_ddim_moves_kept_boxes_away_from_the_prediction_with_the_same_refills(alphas_cumprod):
    draws = _draws(1)
    x0_calls = _run("x0", alphas_cumprod, draws)
    ddim_calls = _run("ddim", alphas_cumprod, draws)
    # The first call sees the same x_T in both modes, hence the same renewal decision.
    torch.testing.assert_close(x0_calls[0][1], ddim_calls[0][1], rtol=0, atol=0)
    for b, kept in enumerate(KEPT):
        k = len(kept)
        ddim_kept, x0_kept = ddim_calls[1][0][b, :k], x0_calls[1][0][b, :k]
        assert (ddim_kept - x0_kept).abs().min() > 0.5  # the DDIM noise moved every kept box
        torch.testing.assert_close(ddim_calls[1][0][b, k:], x0_calls[1][0][b, k:], rtol=0, atol=0)


def test_x0_without_renewal_carries_every_prediction_in_order(alphas_cumprod):
    all_kept = (list(range(N)), list(range(N)))
    draws = _draws(2, steps=3, kept=all_kept)
    calls = _run("x0", alphas_cumprod, draws, steps=3, box_renewal=False)
    assert len(calls) == 3
    for (_, pred), (next_in, _) in zip(calls[:-1], calls[1:]):
        for b in range(2):
            expected = _clamped(pred[b], WHWH[b : b + 1])
            torch.testing.assert_close(next_in[b], expected, rtol=0, atol=1e-4)
    # The carried box is the clamped one: proposal 5 was predicted far outside the image and comes
    # back inside the ±scale signal box (centre in the image, width <= image width). Which of the
    # sampler's clamp and signal_to_boxes' clamp does it is invisible here (both are idempotent).
    assert calls[0][1][0, 5, 0] < -128 and calls[1][0][0, 5, 0] >= -64 - 1e-3


def test_renew_and_step_x0_is_the_compacted_prediction():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7], [0.1, 0.6, 0.1, 0.1, 0.1]])
    refills = {}

    def draw(b, shape):
        refills[(b, shape[0])] = torch.full(shape, 100.0 + b)  # recognisable noise
        return refills[(b, shape[0])]

    out = renew_and_step(x0, eps, scores, 0.5, 0.3, 0.6, 1.0, draw, update="x0")
    torch.testing.assert_close(out[0, :3], x0[0, [0, 2, 4]], rtol=0, atol=0)
    torch.testing.assert_close(out[1, :1], x0[1, [1]], rtol=0, atol=0)
    assert (out[0, 3:] == 100.0).all() and (out[1, 1:] == 101.0).all()
    assert sorted(refills) == [(0, 2), (0, 3), (1, 1), (1, 4)]  # DDIM noise drawn even if unused


def test_invalid_update_is_refused():
    assert STEP_UPDATES == SAMPLER_UPDATES
    with pytest.raises(ValueError, match="update must be one of .*'x_0'"):
        DDIMBoxSampler(steps=2, update="x_0")
    x = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="update must be one of"):
        renew_and_step(
            x, x, torch.ones(1, 2), 0.5, 0.3, 0.6, 1.0, lambda b, s: torch.zeros(s), update="none"
        )


@pytest.mark.parametrize("update", ["ddim", "x0"])
def test_config_key_reaches_the_sampler_of_build_model(update):
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLER_UPDATE", update)
    assert build_model(cfg).sampler.update == update
