"""The graph-friendly sampler (SAMPLING_MODE "graph"): masked renewal, batched NMS, and where it
must agree with the parity sampler.

A toy denoiser (a fixed function of the boxes and t) stands in for the head, so the sampler's
arithmetic is checked without the head's rounding. Images are non-square and of different sizes.
"""
import pytest
import torch

from diffusiondet.diffusion import (
    TorchRandom,
    boxes_to_signal,
    ddim_step,
    ddim_time_pairs,
    masked_renew_and_step,
    renew_and_step,
    signal_to_boxes,
)
from diffusiondet.diffusion.schedule import cosine_beta_schedule, diffusion_buffers
from diffusiondet.modeling.graph_sampler import GraphBoxSampler, batched_class_nms
from diffusiondet.modeling.postprocess import merge_candidates
from diffusiondet.modeling.sampler import DDIMBoxSampler

pytestmark = pytest.mark.numerics

ALPHAS = diffusion_buffers(cosine_beta_schedule(1000))["alphas_cumprod"]
WHWH = torch.tensor([[96.0, 64.0, 96.0, 64.0], [70.0, 110.0, 70.0, 110.0]])
K, N = 3, 12


def toy_denoise(seed=0, bias=0.0):
    """denoise_fn whose logits and boxes depend on the boxes and on t (1 or B timesteps)."""
    g = torch.Generator().manual_seed(seed)
    w_cls, w_box = torch.randn(5, K, generator=g), torch.randn(5, 4, generator=g)

    def fn(boxes, t):
        batch, num = boxes.shape[:2]
        time = (t.float() / 1000).view(-1, 1, 1).expand(batch, num, 1)
        feats = torch.cat([boxes / 50.0, time], dim=-1)  # (B, N, 5)
        return {
            "pred_logits": feats @ w_cls * 3 + bias,
            "pred_boxes": boxes + torch.tanh(feats @ w_box) * 8,
            "extra": feats[..., :2] * 2,  # a per-proposal extra field, carried along
        }

    return fn


def rngs(seed=0):
    return [TorchRandom(generator=torch.Generator().manual_seed(seed + b)) for b in range(2)]


def samplers(**kwargs):
    kwargs = {"steps": 4, "renewal_threshold": 0.0, "use_nms": False, **kwargs}
    return DDIMBoxSampler(**kwargs), GraphBoxSampler(**kwargs)


@pytest.mark.parametrize(
    "steps, renewal",
    [(1, True), (2, True), (4, False), (2, False)],  # renewal: up to the first refill draw
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_box_kept_gives_the_parity_candidates(steps, renewal, eta):
    # With every proposal kept (threshold 0, or no renewal), both samplers draw the same
    # numbers in the same order and compute the same update: the candidates agree row for row.
    parity, graph = samplers(steps=steps, eta=eta, box_renewal=renewal)
    expected = parity.sample_candidates(toy_denoise(), ALPHAS, WHWH, N, per_image_rng=rngs())
    got = graph.sample_candidates(toy_denoise(), ALPHAS, WHWH, N, per_image_rng=rngs())
    for b in range(2):
        want = merge_candidates(expected[b])
        assert len(got[b]) == 1 and got[b][0].keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[b][0][name], want[name], rtol=1e-6, atol=1e-5)


def reference_masked_run(denoise, steps, eta, threshold, seed=0):
    """Float64, slot by slot: the documented semantics of the graph sampler's loop."""
    gens = rngs(seed)
    x = torch.stack([g.randn((N, 4)) for g in gens]).double()
    history, kept_counts = [], []
    for t, t_next in ddim_time_pairs(1000, steps):
        out = denoise(signal_to_boxes(x.float(), WHWH, 2.0), torch.tensor([t]))
        x0 = boxes_to_signal(out["pred_boxes"].double(), WHWH.double(), 2.0).clamp(-2, 2)
        a_t = float(ALPHAS[t])
        eps = (x / a_t**0.5 - x0) / (1 / a_t - 1) ** 0.5
        history.append(out)
        if t_next < 0:
            break
        draws = [[g.randn((N, 4)).double() for _ in range(2)] for g in gens]
        scores = torch.sigmoid(out["pred_logits"]).max(-1).values
        nxt = torch.empty_like(x)
        for b in range(2):
            kept_counts.append(int((scores[b] > threshold).sum()))
            for i in range(N):
                if scores[b, i] > threshold:
                    nxt[b, i] = ddim_step(x0[b, i], eps[b, i], a_t, float(ALPHAS[t_next]), eta, draws[b][0][i])
                else:
                    nxt[b, i] = draws[b][1][i]
        x = nxt
    return history, kept_counts


def test_masked_renewal_follows_the_slot_by_slot_reference():
    denoise = toy_denoise(seed=3, bias=-6.0)
    seen = []

    def recording(boxes, t):
        out = denoise(boxes, t)
        seen.append(out)
        return out

    graph = GraphBoxSampler(steps=4, renewal_threshold=0.5, use_nms=False, ensemble="all_steps")
    graph.sample_candidates(recording, ALPHAS, WHWH, N, per_image_rng=rngs(5))
    reference, kept = reference_masked_run(denoise, 4, 1.0, 0.5, seed=5)
    # Both kinds of slot occur, so the test sees the DDIM update and the refill.
    assert max(kept) > 0 and min(kept) < N and any(0 < k < N for k in kept), kept
    assert len(seen) == len(reference) == 4
    for got, want in zip(seen, reference):
        torch.testing.assert_close(got["pred_boxes"], want["pred_boxes"], rtol=1e-5, atol=1e-4)


def test_masked_step_keeps_slots_in_place():
    g = torch.Generator().manual_seed(0)
    x0, eps, ddim_noise, refill = (torch.randn(2, 6, 4, generator=g) for _ in range(4))
    scores = torch.rand(2, 6, generator=g)
    coefs = (0.6, 0.3, 0.7)
    out = masked_renew_and_step(x0, eps, scores, 0.5, coefs, ddim_noise, refill)
    stepped = 0.6 * x0 + 0.3 * eps + 0.7 * ddim_noise
    keep = scores > 0.5
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(out[keep], stepped[keep])
    assert torch.equal(out[~keep], refill[~keep])
    assert torch.equal(masked_renew_and_step(x0, eps, scores, 0.5, coefs, ddim_noise, refill, update="x0")[keep], x0[keep])
    torch.testing.assert_close(masked_renew_and_step(x0, eps, scores, 0.5, coefs, ddim_noise, refill, renew=False), stepped)
    with pytest.raises(ValueError, match="update must be one of"):
        masked_renew_and_step(x0, eps, scores, 0.5, coefs, ddim_noise, refill, update="bad")


def test_masked_step_equals_compacting_step_when_all_kept():
    g = torch.Generator().manual_seed(1)
    x0, eps, noise = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    scores = torch.ones(2, 5)
    draws = {0: [noise[0], torch.zeros(0, 4)], 1: [noise[1], torch.zeros(0, 4)]}
    compacted = renew_and_step(x0, eps, scores, 0.5, 0.4, 0.7, 1.0, lambda b, s: draws[b].pop(0))
    from diffusiondet.diffusion import ddim_coefficients

    masked = masked_renew_and_step(x0, eps, scores, 0.5, ddim_coefficients(0.4, 0.7, 1.0), noise, noise * 0)
    torch.testing.assert_close(masked, compacted, rtol=0, atol=1e-6)


def random_candidates(seed, rows=60):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(rows, 2, generator=g) * 60
    wh = 5 + torch.rand(rows, 2, generator=g) * 30
    return {
        "boxes": torch.cat([xy, xy + wh], dim=1),
        "scores": torch.rand(rows, generator=g),
        "classes": torch.randint(0, 2, (rows,), generator=g),
        "extra": torch.randn(rows, 3, generator=g),
    }


@pytest.mark.parametrize("cap", [0, 5])
def test_batched_nms_equals_nms_per_image(cap):
    parity, graph = samplers(use_nms=True, nms_threshold=0.5, detections_per_image=cap)
    per_image = [random_candidates(seed) for seed in range(3)]
    got = graph.select_batch([[c] for c in per_image])
    for cand, det in zip(per_image, got):
        want = parity.select_detections([cand])
        assert len(det["scores"]) < len(cand["scores"])  # NMS removed overlapping boxes
        if cap:
            assert len(det["scores"]) == cap
        for name in want:
            assert torch.equal(det[name], want[name]), name


def test_batched_nms_never_suppresses_across_images_or_classes():
    box = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    boxes = box.expand(2, 3, 4).clone()  # the same box: 2 images x 3 rows
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    classes = torch.tensor([[0, 1, 0], [0, 0, 1]])
    keep, counts = batched_class_nms(boxes, scores, classes, 0.5)
    assert counts == [2, 2]
    assert keep.tolist() == [0, 1, 3, 5]  # the lower-scoring duplicate of each group goes


def test_host_alphas_are_read_once_per_buffer():
    graph = GraphBoxSampler(steps=2)
    first = graph.host_alphas(ALPHAS)
    assert first == ALPHAS.tolist()
    assert graph.host_alphas(ALPHAS) is first  # cached: no device read per step
    coefs = graph.step_coefficients(first, 999, -1)
    assert coefs[2:] == [1.0, 0.0, 0.0]  # the last call: √ᾱ_next = 1, c = σ = 0
