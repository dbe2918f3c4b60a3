"""Replaying the official sampling recordings (fixture ``sampling[S]``) through DDIMBoxSampler.

These are teacher-forced replays of v1, whose random-weight head is chaotic. The free-running,
end-to-end golden tests of sampling (S = 1, 2, 4, 8, per-call inputs and outputs and final
detections) use the tamed-head recording v2: see test_official_sampling_golden.py.

Shape legend: N proposals (50), K classes (5), S sampling steps, M detections.
Boxes: abs xyxy in image 0 of the fixture (h, w) = (96, 128); "signal" = (b·2 − 1)·2.

What can and cannot be matched (measured on this fixture, torch 2.14.1 CPU):

* The recorded detections come from 6 free-running stages of a random-weight head whose boxes
  grow to ~3e4 px; every stage amplifies float rounding 20-40×. On the recorded x_T, final-stage
  logits of the SAME head differ by up to 1.2 between two exact-arithmetic-equivalent float32
  evaluations (DynamicConv in one chunk vs one proposal per chunk) and by 1.9 between float32
  and float64, while stage 0 agrees to 1e-5 (and matches the official stage 0 to 1e-5, see
  test_head.py). Only 16 % of the official stage-0 logits are even bit-identical to ours: the
  recording machine's kernels round differently, so no implementation can reproduce the recorded
  final detections. Measured against the recording, S = 1 gives 16 detections instead of 12
  (float32; float64: 13) with box differences up to 82 px and score differences up to 0.075; for
  S = 4 the first renewal keeps 19 boxes (float32; 18-22 across the variants above) instead of
  the recorded 20, so the recorded draws do not even fit.
* Hence the strictest checks that hold: (1) S = 1 with the official 6-stage head consumes the
  recorded draw, feeds the head a bit-identical first input, and equals an independent
  re-statement of the official sampler (``_reference_sampler``) run on the same
  head; (2) S = 4 consumes all 7 recorded draws (kind and size checked) and equals that reference
  when the denoiser is teacher-forced: the official head's stage 0 (reproducible, see above) with
  its logits shifted per call so that renewal keeps exactly the recorded number of boxes.
"""
import pytest
import torch
from detectron2.layers import batched_nms
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

from diffusiondet.diffusion import ReplayRandom
from diffusiondet.modeling.acceleration import set_head_speed_options
from diffusiondet.modeling.head import DynamicHead
from diffusiondet.modeling.sampler import DDIMBoxSampler

# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # p2..p5, fixture meta["pooler"]
SNR_SCALE = 2.0
# The official (t, t_next) pairs, written out.
OFFICIAL_TIME_PAIRS = {1: [(999, -1)], 4: [(999, 749), (749, 499), (499, 249), (249, -1)]}


def _official_head(parity, num_stages=6, dynamic_chunk_size=0):
    meta = parity["meta"]
    head = DynamicHead(
        num_classes=meta["num_classes"], in_channels=meta["hidden_dim"],
        hidden_dim=meta["hidden_dim"], dim_feedforward=meta["dim_feedforward"],
        nhead=meta["nheads"], num_stages=num_stages, num_cls=meta["num_cls"],
        num_reg=meta["num_reg"], dim_dynamic=meta["dim_dynamic"], pooler_scales=SCALES,
    )  # fmt: skip
    set_head_speed_options(head, dynamic_chunk_size=dynamic_chunk_size)
    stage_prefixes = tuple(f"head.head_series.{i}." for i in range(num_stages))
    state = {
        name[len("head.") :]: value
        for name, value in parity["head_state_dict"].items()
        if name.startswith(stage_prefixes) or name.startswith("head.time_mlp.")
    }
    head.load_state_dict(state, strict=True)
    return head.eval()


class FinalStageDenoiser:
    """``denoise_fn`` of the sampler: the head's last stage on image 0's features; logs inputs."""

    def __init__(self, head, parity):
        self.head = head
        self.features = [level[0:1] for level in parity["features"]]  # (1, D, H_l, W_l)
        self.calls = []

    def __call__(self, boxes, t):
        self.calls.append(boxes.clone())
        with torch.no_grad():
            out = self.head(self.features, boxes, t)
        return {"pred_logits": out["pred_logits"][-1], "pred_boxes": out["pred_boxes"][-1]}


class RenewalForcedDenoiser(FinalStageDenoiser):
    """Teacher-forces box renewal: call i's logits are shifted so that exactly ``kept[i]``
    proposals have a best score above 0.5 (the recorded count); ``gaps`` logs, per call, the
    logit margin between the last kept and the first dropped proposal."""

    def __init__(self, head, parity, kept):
        super().__init__(head, parity)
        self.kept = list(kept)
        self.gaps = []

    def __call__(self, boxes, t):
        out = super().__call__(boxes, t)
        call = len(self.calls) - 1
        if call < len(self.kept) and 0 < self.kept[call] < boxes.shape[1]:
            best = out["pred_logits"][0].amax(-1).sort(descending=True).values  # (N,)
            k = self.kept[call]
            self.gaps.append((best[k - 1] - best[k]).item())
            out["pred_logits"] = out["pred_logits"] - (best[k - 1] + best[k]) / 2
        return out


def _reference_signal_to_boxes(x, whwh):
    """Official mapping: (N, 4) signal -> clamp to ±s, (x/s + 1)/2, cxcywh -> xyxy, × (w, h, w, h)."""
    cx, cy, w, h = ((x.clamp(-SNR_SCALE, SNR_SCALE) / SNR_SCALE + 1) / 2).unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1) * whwh


def _reference_sampler(
    denoise_fn, alphas_cumprod, whwh, draws, steps, ensemble_last, state_dtype=torch.float64
):
    """The official sampler restated for one image without any project code (batch 1, as recorded).

    ``whwh`` (4,) float32; ``draws`` the recorded (kind, tensor) pairs. x_T, the first box
    mapping and x̂_0 are float32; ``state_dtype`` is the dtype of ε̂ and of x after the first
    DDIM step: float64 in the official code (ᾱ_t is gathered as a (B, 1, 1) float64 tensor and
    promotes), float32 to restate our sampler's precision.
    Returns a candidate dict after class-aware NMS 0.5 (not clipped).
    """
    draws = iter(tensor for _, tensor in draws)
    x = next(draws).reshape(-1, 4)  # (N, 4) x_T, signal
    num_boxes = x.shape[0]
    candidates = []
    for t, t_next in OFFICIAL_TIME_PAIRS[steps]:
        out = denoise_fn(_reference_signal_to_boxes(x, whwh)[None], torch.tensor([t]))
        logits, pred = out["pred_logits"][0], out["pred_boxes"][0]  # (N, K), (N, 4)
        x1, y1, x2, y2 = (pred / whwh).unbind(-1)
        x0 = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)
        x0 = ((x0 * 2 - 1) * SNR_SCALE).clamp(-SNR_SCALE, SNR_SCALE)
        a_t = alphas_cumprod[t]
        eps = ((1 / a_t).sqrt() * x.to(state_dtype) - x0) / (1 / a_t - 1).sqrt()
        if steps == 1 or t_next >= 0 or ensemble_last:
            scores, flat = torch.sigmoid(logits).flatten().topk(num_boxes, sorted=False)
            num_classes = logits.shape[1]
            candidates.append((pred[flat // num_classes], scores, flat % num_classes))
        if t_next < 0:
            break
        keep = torch.sigmoid(logits).amax(-1) > 0.5
        a_next = alphas_cumprod[t_next]
        sigma = ((1 - a_t / a_next) * (1 - a_next) / (1 - a_t)).sqrt()  # η = 1
        direction = (1 - a_next - sigma**2).sqrt()
        noise, refill = (next(draws).reshape(-1, 4).to(state_dtype) for _ in range(2))
        x = torch.cat([a_next.sqrt() * x0[keep] + direction * eps[keep] + sigma * noise, refill])
    boxes, scores, classes = (torch.cat(parts) for parts in zip(*candidates))
    keep = batched_nms(boxes, scores, classes, 0.5)
    return {"boxes": boxes[keep], "scores": scores[keep], "classes": classes[keep]}


def _clipped(det, image_size):
    """detector_postprocess at the network size (clip + drop empty), then a canonical order."""
    inst = Instances(image_size)
    inst.pred_boxes = Boxes(det["boxes"].float())
    inst.scores = det["scores"].float()
    inst.pred_classes = det["classes"]
    inst = detector_postprocess(inst, *image_size)
    boxes, scores, classes = inst.pred_boxes.tensor, inst.scores, inst.pred_classes
    # Sort by score, breaking ties by class then box so both sides line up.
    order = sorted(
        range(len(scores)), key=lambda i: (-scores[i].item(), classes[i].item(), *boxes[i].tolist())
    )
    return boxes[order], scores[order], classes[order]


def _run(parity, steps, denoiser, ensemble="official", use_nms=True):
    height, width = parity["image_sizes"][0].tolist()
    whwh = torch.tensor([[width, height, width, height]], dtype=torch.float32)
    rng = ReplayRandom(parity["sampling"][steps]["draws"])
    sampler = DDIMBoxSampler(steps=steps, ensemble=ensemble, use_nms=use_nms)
    (det,) = sampler(denoiser, parity["schedule"]["alphas_cumprod"], whwh, 50, rng=rng)
    return det, rng


def _assert_same_detections(ours, ref, box_atol, score_atol):
    (ours_boxes, ours_scores, ours_classes), (ref_boxes, ref_scores, ref_classes) = ours, ref
    assert len(ours_scores) == len(ref_scores) > 0
    assert torch.equal(ours_classes, ref_classes)
    assert (ours_boxes - ref_boxes).abs().max().item() <= box_atol
    assert (ours_scores - ref_scores).abs().max().item() <= score_atol


@pytest.mark.parametrize("steps", [1, 4])
def test_recorded_draws_follow_the_sampler_protocol(parity, steps):
    # x_T (N, 4), then per non-final step: DDIM noise for the k kept boxes, N − k refill boxes.
    draws = parity["sampling"][steps]["draws"]
    assert len(draws) == 1 + 2 * (steps - 1)
    assert draws[0][0] == "randn" and draws[0][1].shape == (1, 50, 4)
    for (noise_kind, noise), (refill_kind, refill) in zip(draws[1::2], draws[2::2]):
        assert (noise_kind, refill_kind) == ("randn_like", "randn")
        assert noise.shape[1] + refill.shape[1] == 50


def test_one_step_replay_with_the_official_head(parity):
    denoiser = FinalStageDenoiser(_official_head(parity), parity)
    det, rng = _run(parity, 1, denoiser)
    assert rng.remaining == 0

    reference = FinalStageDenoiser(_official_head(parity), parity)
    whwh = torch.tensor([128.0, 96.0, 128.0, 96.0])
    alphas_cumprod = parity["schedule"]["alphas_cumprod"]
    ref = _reference_sampler(
        reference, alphas_cumprod, whwh, parity["sampling"][1]["draws"], 1, ensemble_last=False
    )
    # The chaotic head makes any 1-ulp difference in its input visible, so the first input must
    # be bit-identical to the official mapping of x_T (and then outputs are, too).
    assert torch.equal(denoiser.calls[0], reference.calls[0])
    _assert_same_detections(_clipped(det, (96, 128)), _clipped(ref, (96, 128)), 0.0, 0.0)


@torch.no_grad()
def test_recorded_detections_are_beyond_float32_reproducibility(parity):
    # Why the official S = 1 detections are not compared directly (see the module docstring):
    # two evaluations of the same head that differ only in float rounding disagree at the last
    # stage by far more than any sane tolerance, while stage 0 agrees.
    x_T = parity["sampling"][1]["draws"][0][1][0]  # (N, 4)
    boxes = _reference_signal_to_boxes(x_T, torch.tensor([128.0, 96.0, 128.0, 96.0]))[None]
    features, t = [level[0:1] for level in parity["features"]], torch.tensor([999])
    one_chunk = _official_head(parity)(features, boxes, t)["pred_logits"]
    per_proposal = _official_head(parity, dynamic_chunk_size=1)(features, boxes, t)["pred_logits"]
    change = (torch.sigmoid(one_chunk) - torch.sigmoid(per_proposal)).abs().amax(dim=(1, 2, 3))
    assert change[0] < 1e-5
    assert change[-1] > 5e-2  # measured 0.23 (logits: 1.18); stage 0: 2.1e-7


def test_float64_head_replays_too(parity):
    # A float64 head gives float64 logits but float32 boxes (detectron2 decodes in float32);
    # NMS used to reject that mix. (Its detections are as far from the recording as float32's:
    # 13 instead of 12, see the module docstring.)
    denoiser = FinalStageDenoiser(_official_head(parity).double(), parity)
    denoiser.features = [level.double() for level in denoiser.features]
    det, rng = _run(parity, 1, denoiser)
    assert rng.remaining == 0
    assert det["scores"].dtype == torch.float64 and len(det["scores"]) > 0


def _renewal_forced_run(parity, ensemble="official", use_nms=True):
    kept = [noise.shape[1] for _, noise in parity["sampling"][4]["draws"][1::2]]  # [20, 30, 31]
    denoiser = RenewalForcedDenoiser(_official_head(parity, num_stages=1), parity, kept)
    det, rng = _run(parity, 4, denoiser, ensemble=ensemble, use_nms=use_nms)
    return det, rng, denoiser, kept


def test_four_step_replay_consumes_every_recorded_draw_and_follows_the_official_sampler(parity):
    det, rng, denoiser, kept = _renewal_forced_run(parity)
    assert rng.remaining == 0  # and ReplayRandom checked every kind and size on the way
    assert len(denoiser.calls) == 4
    assert min(denoiser.gaps) > 1e-3  # measured >= 2.6e-3: renewal is robust to rounding
    ours = _clipped(det, (96, 128))

    for state_dtype, input_atol, box_atol in [
        # Same precision as our sampler: only the algorithm is compared. Measured: inputs of
        # calls 2-4 within 4.6e-5 px, detections 1.2e-4 px, scores 1.8e-6.
        (torch.float32, 1e-3, 1e-3),
        # Official precision (x float64 between steps, ours float32; its effect is measured below).
        # The random-weight head's stage 0 amplifies the 1e-5 px storage rounding ~10x per call:
        # measured input differences 1.2e-5, 2.0e-4, 2.8e-3 px at calls 2-4, detections
        # 1.8e-3 px, scores 1.8e-5. The bound is 1e-2 px rather than 1e-3 px for that reason.
        (torch.float64, 1e-2, 1e-2),
    ]:
        reference = RenewalForcedDenoiser(_official_head(parity, num_stages=1), parity, kept)
        ref = _reference_sampler(
            reference,
            parity["schedule"]["alphas_cumprod"],
            torch.tensor([128.0, 96.0, 128.0, 96.0]),
            parity["sampling"][4]["draws"],
            4,
            ensemble_last=False,
            state_dtype=state_dtype,
        )
        assert torch.equal(denoiser.calls[0], reference.calls[0])
        for ours_in, ref_in in zip(denoiser.calls[1:], reference.calls[1:]):
            assert (ours_in.double() - ref_in.double()).abs().max().item() <= input_atol
        _assert_same_detections(ours, _clipped(ref, (96, 128)), box_atol, 1e-4)


def test_all_steps_ensemble_adds_the_last_call_on_the_same_draws(parity):
    official, _, official_denoiser, _ = _renewal_forced_run(parity, "official", use_nms=False)
    all_steps, rng, all_steps_denoiser, _ = _renewal_forced_run(parity, "all_steps", use_nms=False)
    assert rng.remaining == 0
    assert official["scores"].shape == (3 * 50,)  # calls at t = 999, 749, 499
    assert all_steps["scores"].shape == (4 * 50,)  # ... and the last one at t = 249
    for key in ("boxes", "scores", "classes"):
        torch.testing.assert_close(all_steps[key][:150], official[key], rtol=0, atol=0)
    # Same trajectory: the ensemble choice does not feed back into sampling.
    for a, b in zip(official_denoiser.calls, all_steps_denoiser.calls):
        assert torch.equal(a, b)
    # After NMS the last call still changes the detections.
    official_nms = _renewal_forced_run(parity, "official")[0]
    all_steps_nms = _renewal_forced_run(parity, "all_steps")[0]
    assert len(all_steps_nms["scores"]) != len(official_nms["scores"]) or not torch.equal(
        all_steps_nms["boxes"], official_nms["boxes"]
    )
