"""Batched DDIM sampling of boxes from pure noise (DiffusionDet paper, arXiv 2211.09788, Sec. 3.4
and Alg. 2), with per-image box renewal.

Shape legend: B images, N proposals, K classes, S sampling steps, M detections of one image.
Box formats: abs xyxy = absolute pixels in the (resized, un-padded) network input image;
signal = ``(normalised cxcywh * 2 - 1) * snr_scale``.

Differences from the official ``ddim_sample``, both switchable: renewal uses each image's own
scores (the official code uses image 0's for the whole batch), and ``ensemble="all_steps"``
also ensembles the last model call (the official code drops it, issue #56). ``update="x0"`` is
the paper's "without DDIM" ablation (Table 4c): kept boxes go to the next call as predicted.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..diffusion import (
    RandomSource,
    TorchRandom,
    boxes_to_signal,
    ddim_time_pairs,
    predict_noise_from_start,
    renew_and_step,
    signal_to_boxes,
)
from ..options import ENSEMBLE_MODES, SAMPLER_UPDATES
from .postprocess import cap_detections, merge_candidates, nms_candidates, topk_candidates

# denoise_fn(boxes (B, N, 4) abs xyxy, t (B,) long) -> {"pred_logits": (B, N, K),
# "pred_boxes": (B, N, 4) abs xyxy, optional extra per-proposal (B, N, ...) fields}. Per-image
# outputs (e.g. a mask feature map) do not belong here: they do not change between calls.
DenoiseFn = Callable[[Tensor, Tensor], Dict[str, Tensor]]

_PREDICTION_KEYS = ("pred_logits", "pred_boxes")


class DDIMBoxSampler:
    """DDIM loop over (t, t_next) pairs: denoise, collect candidates, renew boxes, step.

    :meth:`sample_candidates` is the loop; :meth:`select_detections` (merge the ensembled
    calls, NMS, cap) is the post-processing the meta-architecture runs per image, with that
    image's context; calling the sampler does both.

    Args:
        steps: S, number of model calls (SAMPLE_STEP).
        eta: DDIM η (1.0 officially).
        snr_scale: signal scale s (2.0 officially).
        box_renewal: drop proposals scoring <= ``renewal_threshold`` and refill with noise.
        renewal_threshold: score threshold of box renewal, in [0, 1].
        ensemble: "official" — with S > 1 every call except the last is ensembled (S = 1 uses its
            single call); "all_steps" — every call is ensembled.
        use_focal: sigmoid scores over K logits (focal / federated); False = softmax over K + 1.
        use_nms: class-aware NMS on each image's merged candidates.
        nms_threshold: IoU threshold of that NMS, in [0, 1].
        detections_per_image: keep the top-k detections per image; 0 keeps all (official).
        skip_unused_calls: do not make model calls whose outputs nothing uses: with
            ensemble="official" and S > 1, the last call (it is neither ensembled nor stepped).
            Same detections and random draws with 1/S less model time; False (the default)
            keeps the official S calls.
        update: how kept boxes move between calls: "ddim" (official DDIM update) or "x0" (the
            clamped prediction x̂_0 itself is the next call's input; same random draws).
    """

    def __init__(
        self,
        *,
        steps: int,
        eta: float = 1.0,
        snr_scale: float = 2.0,
        box_renewal: bool = True,
        renewal_threshold: float = 0.5,
        ensemble: str = "official",
        use_focal: bool = True,
        use_nms: bool = True,
        nms_threshold: float = 0.5,
        detections_per_image: int = 0,
        skip_unused_calls: bool = False,
        update: str = "ddim",
    ):
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if snr_scale <= 0:
            raise ValueError(f"snr_scale must be > 0, got {snr_scale}")
        if not 0.0 <= renewal_threshold <= 1.0:
            raise ValueError(f"renewal_threshold must be in [0, 1], got {renewal_threshold}")
        if ensemble not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble must be one of {ENSEMBLE_MODES}, got {ensemble!r}")
        if not 0.0 <= nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
        if detections_per_image < 0:
            raise ValueError(f"detections_per_image must be >= 0, got {detections_per_image}")
        if update not in SAMPLER_UPDATES:
            raise ValueError(f"update must be one of {SAMPLER_UPDATES}, got {update!r}")
        self.steps = int(steps)
        self.eta = eta
        self.snr_scale = snr_scale
        self.box_renewal = box_renewal
        self.renewal_threshold = renewal_threshold
        self.ensemble = ensemble
        self.use_focal = use_focal
        self.use_nms = use_nms
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.skip_unused_calls = skip_unused_calls
        self.update = update

    def _last_call_unused(self, steps: int) -> bool:
        """Whether the ensemble drops the last call of an S-step run (official, S > 1)."""
        return self.ensemble != "all_steps" and steps > 1

    def _ensembles_call(self, t_next: int) -> bool:
        """Whether the candidates of the call at (t, t_next) enter the ensemble."""
        is_last_call = t_next < 0
        return not (is_last_call and self._last_call_unused(self.steps))

    def model_calls(self, steps: Optional[int] = None) -> int:
        """Model calls one run of ``steps`` steps (default: this sampler's S) makes."""
        steps = self.steps if steps is None else steps
        return steps - 1 if self.skip_unused_calls and self._last_call_unused(steps) else steps

    def proposal_scores(self, logits: Tensor) -> Tensor:
        """(B, N) confidence used by box renewal: the best class probability of each proposal."""
        if self.use_focal:
            return torch.sigmoid(logits).max(dim=-1).values
        return torch.softmax(logits, dim=-1)[..., :-1].max(dim=-1).values

    def __call__(
        self,
        denoise_fn: DenoiseFn,
        alphas_cumprod: Tensor,
        image_whwh: Tensor,
        num_boxes: int,
        rng: Optional[RandomSource] = None,
        per_image_rng: Optional[Sequence[RandomSource]] = None,
    ) -> List[Dict[str, Tensor]]:
        """:meth:`sample_candidates` then :meth:`select_detections` for every image.

        Returns:
            B dicts: ``boxes`` (M, 4) abs xyxy in the network input image (not clipped),
            ``scores`` (M,), ``classes`` (M,) long, plus the extra fields (M, ...); sorted by
            score descending when NMS or a detection cap is applied.
        """
        candidates = self.sample_candidates(
            denoise_fn, alphas_cumprod, image_whwh, num_boxes, rng, per_image_rng
        )
        return self.select_batch(candidates)

    def sample_candidates(
        self,
        denoise_fn: DenoiseFn,
        alphas_cumprod: Tensor,
        image_whwh: Tensor,
        num_boxes: int,
        rng: Optional[RandomSource] = None,
        per_image_rng: Optional[Sequence[RandomSource]] = None,
    ) -> List[List[Dict[str, Tensor]]]:
        """Run DDIM for a batch of images and return the candidates of the ensembled calls.

        Random draws, per image b in order (through ``per_image_rng[b]`` if given, else the shared
        ``rng``, default ``TorchRandom`` on ``image_whwh``'s device): x_T[b] ~ randn((N, 4)); then
        in each non-final step the DDIM noise of the kept boxes (k_b, 4) and the refill
        (N − k_b, 4). Each image therefore consumes 1 + 2·(S − 1) draws, and a batch run with
        per-image sources equals running each image alone.

        Args:
            denoise_fn: one model call, see ``DenoiseFn``; every output other than logits and
                boxes must be a per-proposal (B, N, ...) tensor and is carried into the
                candidates under the same key.
            alphas_cumprod: (T,) float64 ᾱ buffer; T sets the time pairs.
            image_whwh: (B, 4) (w, h, w, h) of each un-padded network input image.
            num_boxes: N, proposals per image.
            rng: shared random source.
            per_image_rng: B random sources, one per image (takes precedence over ``rng``).

        Returns:
            per image, one candidate dict per ensembled call (see ``postprocess``): ``boxes``
            (M, 4) abs xyxy, ``scores`` (M,), ``classes`` (M,) long and the extra fields
            (M, ...), each sorted by score descending.
        """
        batch, device = image_whwh.shape[0], image_whwh.device
        image_whwh, shared_rng = sampling_inputs(image_whwh, rng, per_image_rng)
        dtype = image_whwh.dtype

        def draw(image_index: int, shape: Tuple[int, ...]) -> Tensor:
            source = per_image_rng[image_index] if per_image_rng is not None else shared_rng
            return source.randn(shape).to(device=device, dtype=dtype)

        x = torch.stack([draw(b, (num_boxes, 4)) for b in range(batch)])  # (B, N, 4) signal
        per_call_candidates = []
        for t, t_next in ddim_time_pairs(alphas_cumprod.shape[0], self.steps):
            if self.skip_unused_calls and not self._ensembles_call(t_next):
                break  # the final call of the official ensemble: its outputs would be dropped
            time = torch.full((batch,), t, dtype=torch.long, device=device)
            outputs = denoise_fn(signal_to_boxes(x, image_whwh, self.snr_scale), time)
            logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
            x0 = boxes_to_signal(pred_boxes.to(dtype), image_whwh, self.snr_scale)
            x0 = torch.clamp(x0, min=-self.snr_scale, max=self.snr_scale)  # (B, N, 4)
            # ε̂ uses the unclamped x, as the official sampler does.
            eps = predict_noise_from_start(x, time, x0, alphas_cumprod)

            if self._ensembles_call(t_next):
                extras = per_proposal_extras(outputs, batch, num_boxes)
                per_call_candidates.append(
                    topk_candidates(logits, pred_boxes, extras, num_boxes, self.use_focal)
                )
            if t_next < 0:
                break
            x = renew_and_step(
                x0,
                eps,
                self.proposal_scores(logits),
                self.renewal_threshold,
                float(alphas_cumprod[t]),
                float(alphas_cumprod[t_next]),
                self.eta,
                draw,
                renew=self.box_renewal,
                update=self.update,
            )
        return [[call[b] for call in per_call_candidates] for b in range(batch)]

    # The parity sampler pools with detectron2's ROIPooler; GraphBoxSampler needs fixed shapes.
    fixed_shape_pooling = False

    def select_batch(self, candidates: List[List[Dict[str, Tensor]]]) -> List[Dict[str, Tensor]]:
        """:meth:`select_detections` for every image of :meth:`sample_candidates`' output."""
        return [self.select_detections(image_candidates) for image_candidates in candidates]

    def select_detections(self, candidates: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Merge one image's per-call candidates, then class-aware NMS and the detection cap.

        Args:
            candidates: that image's entry of :meth:`sample_candidates`.

        Returns:
            the detections, a candidate dict (sorted by score when NMS or the cap applies).
        """
        merged = merge_candidates(candidates)
        if self.use_nms:
            merged = nms_candidates(merged, self.nms_threshold)
        return cap_detections(merged, self.detections_per_image)


def sampling_inputs(
    image_whwh: Tensor, rng: Optional[RandomSource], per_image_rng: Optional[Sequence[RandomSource]]
) -> Tuple[Tensor, RandomSource]:
    """Checks and defaults shared by the samplers: ``image_whwh`` (B, 4) in the sampling dtype
    (its own if floating, else float32) and the shared random source (default ``TorchRandom``
    on its device); raises if ``per_image_rng`` does not have B sources."""
    batch = image_whwh.shape[0]
    dtype = image_whwh.dtype if image_whwh.is_floating_point() else torch.float32
    if per_image_rng is not None and len(per_image_rng) != batch:
        raise ValueError(f"per_image_rng has {len(per_image_rng)} sources for {batch} images")
    shared_rng = rng if rng is not None else TorchRandom(device=image_whwh.device, dtype=dtype)
    return image_whwh.to(dtype), shared_rng


def per_proposal_extras(outputs: Dict[str, Tensor], batch: int, num_boxes: int) -> Dict[str, Tensor]:
    """The outputs of one model call other than logits and boxes, checked to be (B, N, ...)."""
    extras = {}
    for name, value in outputs.items():
        if name in _PREDICTION_KEYS:
            continue
        if not isinstance(value, Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (batch, num_boxes):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"denoise_fn output {name!r} ({shape}) is not a per-proposal (B={batch}, "
                f"N={num_boxes}, ...) tensor; return per-image outputs from elsewhere"
            )
        extras[name] = value
    return extras
