"""SAMPLER_UPDATE "dpmpp_2m": DPM-Solver++(2M) with per-proposal history through box renewal.

A fixed fake denoiser scores proposals by slot index, so the renewal decision is known in advance:
image 0 keeps slots KEPT[0] at every call, image 1 KEPT[1]. With 4 steps, a proposal kept at two
calls in a row takes the 2M step (its history moved with it when renewal reordered the slots), a
proposal refilled at the previous step takes the first-order step. A reference written here tracks
each proposal by identity, in float64, from the formulas of the brief.
"""
import math

import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.diffusion import (
    RandomSource,
    ReplayRandom,
    TorchRandom,
    boxes_to_signal,
    cosine_beta_schedule,
    ddim_time_pairs,
    diffusion_buffers,
    renew_and_step,
    signal_to_boxes,
)
from diffusiondet.diffusion.renewal import SolverHistory, renew_and_dpm_step
from diffusiondet.modeling.sampler import DDIMBoxSampler

from ..utils import tiny_cfg

N, K, STEPS = 8, 3, 4
WHWH = torch.tensor([[128.0, 96.0, 128.0, 96.0], [112.0, 80.0, 112.0, 80.0]])
KEPT = ([0, 2, 3, 7], [1, 6])  # slots scoring above the renewal threshold, per image


@pytest.fixture(scope="module")
def alphas_cumprod():
    return diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]


class SlotDenoiser:
    """pred = 0.4·boxes + 0.6·anchor(slot) + t-dependent shift; logit +3 for KEPT slots, else −3.

    Slot 3's anchor lies far outside the image, so its x̂_0 is clamped. Records every call's
    (input boxes, predicted boxes), both (B, N, 4) abs xyxy.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, boxes, t):
        batch = boxes.shape[0]
        idx = torch.arange(N, dtype=boxes.dtype)
        anchor = torch.stack([5 * idx, 4 * idx, 5 * idx + 30, 4 * idx + 20], dim=-1)  # (N, 4)
        anchor[3] = torch.tensor([-300.0, -200.0, 500.0, 400.0])
        shift = (t.to(boxes.dtype) / 100.0)[:, None, None] * (idx[:, None] - 3.5)  # (B, N, 1)
        pred = 0.4 * boxes + 0.6 * anchor + shift
        logits = torch.full((batch, N, K), -3.0)
        for b, kept in enumerate(KEPT[:batch]):
            logits[b, kept, b % K] = 3.0
        self.calls.append((boxes.clone(), pred.clone()))
        return {"pred_logits": logits, "pred_boxes": pred}


def _lam(a):
    return math.log(math.sqrt(a) / math.sqrt(1 - a))


def _ref_step(x_t, x0, a_t, a_s, x0_prev=None, a_u=None):
    """The brief's formulas: first order, or 2M with D = (1 + 1/2r)·x̂0_t − (1/2r)·x̂0_u."""
    h = _lam(a_s) - _lam(a_t)
    data = x0
    if x0_prev is not None:
        r = (_lam(a_t) - _lam(a_u)) / h
        data = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
    sigma_ratio = math.sqrt(1 - a_s) / math.sqrt(1 - a_t)
    return sigma_ratio * x_t - math.sqrt(a_s) * (math.exp(-h) - 1) * data


def _draws(seed):
    """Per image: x_T (N, 4), then per step DDIM noise (k, 4) and refill (N − k, 4)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for kept in KEPT:
        sizes = [len(kept), N - len(kept)] * (STEPS - 1)
        x_T = torch.randn(N, 4, generator=g)
        out.append([x_T] + [torch.randn(k, 4, generator=g) for k in sizes])
    return out


def _reference(draws, alphas_cumprod):
    """Signal x (B, N, 4) and clamped x̂_0 of every call, float64, proposals tracked by identity."""
    queues = [list(d) for d in draws]
    whwh = WHWH.double()
    x = torch.stack([q.pop(0) for q in queues]).double()
    prev = [[None] * N for _ in KEPT]  # per image, per slot: x̂_0 of the previous call or None
    xs, x0s, a_prev = [], [], None
    denoiser = SlotDenoiser()
    for t, t_next in ddim_time_pairs(1000, STEPS):
        pred = denoiser(signal_to_boxes(x, whwh, 2.0), torch.full((2,), t))["pred_boxes"]
        x0 = boxes_to_signal(pred, whwh, 2.0).clamp(-2.0, 2.0)
        xs.append(x)
        x0s.append(x0)
        if t_next < 0:
            break
        a_t, a_s = float(alphas_cumprod[t]), float(alphas_cumprod[t_next])
        rows, new_prev = [], []
        for b, kept in enumerate(KEPT):
            stepped = [_ref_step(x[b, j], x0[b, j], a_t, a_s, prev[b][j], a_prev) for j in kept]
            queues[b].pop(0)  # the DDIM noise: drawn, unused
            refill = queues[b].pop(0).double()
            rows.append(torch.cat([torch.stack(stepped), refill]))
            new_prev.append([x0[b, j] for j in kept] + [None] * (N - len(kept)))
        x, prev, a_prev = torch.stack(rows), new_prev, a_t
    return xs, x0s


def _run(update, per_image_rng, alphas_cumprod):
    denoiser = SlotDenoiser()
    sampler = DDIMBoxSampler(steps=STEPS, update=update, use_nms=False)
    sampler(denoiser, alphas_cumprod, WHWH, N, per_image_rng=per_image_rng)
    return denoiser.calls


def test_every_call_input_matches_the_per_proposal_reference(alphas_cumprod):
    draws = _draws(0)
    sources = [ReplayRandom(list(d)) for d in draws]
    calls = _run("dpmpp_2m", sources, alphas_cumprod)
    assert [s.remaining for s in sources] == [0, 0]
    ref_x, _ = _reference(draws, alphas_cumprod)
    assert len(calls) == STEPS
    for (boxes_in, _), x in zip(calls, ref_x):
        torch.testing.assert_close(boxes_in.double(), signal_to_boxes(x, WHWH.double(), 2.0),
                                   rtol=0, atol=2e-3)


def test_survivors_take_2m_with_their_own_history_and_refills_first_order(alphas_cumprod):
    draws = _draws(1)
    calls = _run("dpmpp_2m", [ReplayRandom(list(d)) for d in draws], alphas_cumprod)
    xs, x0s = _reference(draws, alphas_cumprod)
    # The step 499 -> 249 (into the 4th call), history from the call at 749: r ≈ 1, so 2M and
    # first order differ clearly (after 999 -> 749 the huge first step in λ makes r ≈ 10).
    a_u, a_t, a_s = (float(alphas_cumprod[t]) for t in (749, 499, 249))
    seen = calls[3][0].double()  # input of the 4th call, abs xyxy
    x_t, x0, hist = xs[2], x0s[2], x0s[1]
    blank = torch.zeros(4, dtype=torch.float64)  # what a refilled slot holds as history

    def check(b, slot, expected, wrong):
        whwh = WHWH[b : b + 1].double()
        torch.testing.assert_close(seen[b, slot], signal_to_boxes(expected, whwh, 2.0)[0],
                                   rtol=0, atol=2e-3)
        assert (signal_to_boxes(wrong, whwh, 2.0) - seen[b, slot]).abs().max() > 0.5

    # Image 0, slot 2 of the 3rd call holds the proposal in slot 3 of the 2nd call: 2M with that
    # call's x̂_0[3] (clamped: slot 3's anchor is far outside), not the unpermuted x̂_0[2].
    assert hist[0, 3].abs().max() == 2.0
    expected = _ref_step(x_t[0, 2], x0[0, 2], a_t, a_s, hist[0, 3], a_u)
    check(0, 1, expected, _ref_step(x_t[0, 2], x0[0, 2], a_t, a_s, hist[0, 2], a_u))
    # Slot 3 holds a proposal refilled after the 1st call and kept at the 2nd: 2M with x̂_0[7].
    expected = _ref_step(x_t[0, 3], x0[0, 3], a_t, a_s, hist[0, 7], a_u)
    check(0, 2, expected, _ref_step(x_t[0, 3], x0[0, 3], a_t, a_s, hist[0, 3], a_u))
    # Slot 7 was refilled after the 2nd call: first order, not 2M with a blank history.
    expected = _ref_step(x_t[0, 7], x0[0, 7], a_t, a_s)
    check(0, 3, expected, _ref_step(x_t[0, 7], x0[0, 7], a_t, a_s, blank, a_u))
    # Image 1: slot 1 holds the 2nd call's slot 6 (history x̂_0[6], not [1]); slot 6 is a refill.
    expected = _ref_step(x_t[1, 1], x0[1, 1], a_t, a_s, hist[1, 6], a_u)
    check(1, 0, expected, _ref_step(x_t[1, 1], x0[1, 1], a_t, a_s, hist[1, 1], a_u))
    expected = _ref_step(x_t[1, 6], x0[1, 6], a_t, a_s)
    check(1, 1, expected, _ref_step(x_t[1, 6], x0[1, 6], a_t, a_s, blank, a_u))


class RecordingRandom(RandomSource):
    """Seeded torch draws, each recorded as (shape, values)."""

    def __init__(self, seed):
        self.source = TorchRandom(generator=torch.Generator().manual_seed(seed))
        self.draws = []

    def randn(self, shape):
        value = self.source.randn(shape)
        self.draws.append((tuple(shape), value.clone()))
        return value


def test_random_draws_are_those_of_ddim(alphas_cumprod):
    recorded = {}
    for update in ("ddim", "dpmpp_2m"):
        sources = [RecordingRandom(5), RecordingRandom(6)]
        calls = _run(update, sources, alphas_cumprod)
        recorded[update] = ([s.draws for s in sources], calls)
    (ddim_draws, ddim_calls), (dpm_draws, dpm_calls) = recorded["ddim"], recorded["dpmpp_2m"]
    assert [len(d) for d in dpm_draws] == [1 + 2 * (STEPS - 1)] * 2
    for image_ddim, image_dpm in zip(ddim_draws, dpm_draws):
        assert [s for s, _ in image_ddim] == [s for s, _ in image_dpm]
        for (_, a), (_, b) in zip(image_ddim, image_dpm):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Same x_T, same refills; the kept boxes do move differently.
    torch.testing.assert_close(ddim_calls[0][0], dpm_calls[0][0], rtol=0, atol=0)
    torch.testing.assert_close(ddim_calls[1][0][0, 4:], dpm_calls[1][0][0, 4:], rtol=0, atol=0)
    assert (ddim_calls[1][0][0, :4] - dpm_calls[1][0][0, :4]).abs().max() > 1.0


def test_renew_and_dpm_step_permutes_the_history_with_the_proposals():
    x0 = torch.arange(5, dtype=torch.float64)[None, :, None].expand(1, 5, 4) * 0.1  # x̂_0[j] = j/10
    x_t = torch.zeros(1, 5, 4, dtype=torch.float64)
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.7]])  # keeps 1, 3, 4 -> slots 0, 1, 2
    history = SolverHistory(-x0, torch.tensor([[True, True, True, False, True]]), 0.05)
    draws = []

    def draw(b, shape):
        draws.append(shape)
        return torch.full(shape, 7.0)

    out, new = renew_and_dpm_step(x_t, x0, scores, 0.5, 0.2, 0.5, draw, history)
    assert draws == [(3, 4), (2, 4)]  # DDIM noise drawn (unused), then the refill
    for slot, j in enumerate([1, 3, 4]):
        prev = -x0[0, j] if j != 3 else None  # proposal 3 has no history
        torch.testing.assert_close(out[0, slot], _ref_step(0.0, x0[0, j], 0.2, 0.5, prev, 0.05))
    assert (out[0, 3:] == 7.0).all()
    torch.testing.assert_close(new.x0[0, :3], x0[0, [1, 3, 4]], rtol=0, atol=0)
    assert new.has_history.tolist() == [[True, True, True, False, False]]
    assert new.alpha_cumprod == 0.2
    with pytest.raises(ValueError, match="renew_and_dpm_step"):
        renew_and_step(x0, x0, scores, 0.5, 0.2, 0.5, 1.0, draw, update="dpmpp_2m")


def test_config_key_reaches_the_sampler_of_build_model():
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLER_UPDATE", "dpmpp_2m")
    assert build_model(cfg).sampler.update == "dpmpp_2m"
