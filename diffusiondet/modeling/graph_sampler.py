"""Graph-friendly DDIM sampling: fixed shapes, no host syncs inside the loop, one graph per step.

Shape legend: B images, N proposals, K logits, C ensembled calls, M = C·N candidates per image.
Box formats: abs xyxy in the network input image; signal = ``(norm cxcywh * 2 - 1) * s``.

How it differs from :class:`DDIMBoxSampler` (the "parity" mode, which replays the official draw
order): renewal masks instead of compacting (:func:`masked_renew_and_step`, N constant), ᾱ comes
from a host-side copy of the schedule, all images share one time embedding per step, and the
candidates of all calls stay in (B, M, ...) tensors until one NMS over the whole batch. With
``compile_step`` the whole step (head, renewal, DDIM update) is one ``torch.compile(fullgraph=True)``
graph, captured as a CUDA graph per (B, N) on GPUs (``mode="reduce-overhead"``).
Random draws with per-image sources, per image b in order: x_T[b] (N, 4); then per non-final
step the DDIM noise (N, 4) and, with box renewal, the refill (N, 4). A shared source draws
(B, N, 4) at a time (x_T, then DDIM noise and refill). Without renewal these are the parity
mode's draws; with renewal they agree up to the first renewal (the parity mode's refill has
N − k_b rows, not N).
"""
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torchvision
from torch import Tensor

from ..diffusion import (
    RandomSource,
    boxes_to_signal,
    ddim_coefficients,
    ddim_time_pairs,
    masked_renew_and_step,
    signal_to_boxes,
)
from .postprocess import CandidateDict, topk_candidate_fields
from .sampler import DDIMBoxSampler, DenoiseFn, per_proposal_extras, sampling_inputs

__all__ = ["GraphBoxSampler", "SamplingSchedule", "batched_class_nms"]

# Row of the per-step coefficient table: √(1/ᾱ_t), √(1/ᾱ_t − 1), then ddim_coefficients' √ᾱ_next,
# c and σ. A tensor input, so a compiled step does not specialise (and recompile) per timestep.
_COEFFICIENTS = 5


class SamplingSchedule(NamedTuple):
    """What the steps of one run need from ᾱ (:meth:`GraphBoxSampler.sampling_schedule`).

    pairs: the S (t, t_next) Python ints; coefficients: (S, ``_COEFFICIENTS``) float64;
    times: (S,) long, each step's t.
    """

    pairs: List[Tuple[int, int]]
    coefficients: Tensor
    times: Tensor


class GraphBoxSampler(DDIMBoxSampler):
    """DDIM with box renewal by masking; same arguments and outputs as :class:`DDIMBoxSampler`.

    Args:
        compile_step: run each step through ``torch.compile(fullgraph=True)`` (CUDA graphs via
            ``mode="reduce-overhead"`` on GPUs). The first call per (B, N) compiles.
        compile_backend: ``torch.compile`` backend ("inductor"; tests use "aot_eager", which
            traces the same single graph without generating code).
        **kwargs: :class:`DDIMBoxSampler` arguments.
    """

    fixed_shape_pooling = True

    def __init__(self, *, compile_step: bool = False, compile_backend: str = "inductor", **kwargs):
        super().__init__(**kwargs)
        self.compile_step = compile_step
        self.compile_backend = compile_backend
        self._compiled: Dict[str, Callable] = {}
        self._host_alphas: Tuple[Optional[Tensor], List[float]] = (None, [])

    def host_alphas(self, alphas_cumprod: Tensor) -> List[float]:
        """ᾱ as Python floats, copied from the device once per buffer, not once per step."""
        if self._host_alphas[0] is not alphas_cumprod:
            self._host_alphas = (alphas_cumprod, alphas_cumprod.detach().double().cpu().tolist())
        return self._host_alphas[1]

    def step_coefficients(self, alphas: List[float], t: int, t_next: int) -> List[float]:
        """The ``_COEFFICIENTS`` floats of the step (t, t_next); ᾱ_next = 1 for the last call."""
        alpha_t = alphas[t]
        alpha_next = alphas[t_next] if t_next >= 0 else 1.0
        return [math.sqrt(1.0 / alpha_t), math.sqrt(1.0 / alpha_t - 1.0)] + list(
            ddim_coefficients(alpha_t, alpha_next, self.eta)
        )

    def step(
        self,
        denoise_fn: DenoiseFn,
        x: Tensor,
        t: Tensor,
        image_whwh: Tensor,
        coefficients: Tensor,
        ddim_noise: Tensor,
        refill: Tensor,
    ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One sampling step with fixed shapes (what gets compiled).

        Args:
            x: (B, N, 4) current signal x_t.
            t: (1,) long, the timestep shared by all images.
            image_whwh: (B, 4) float.
            coefficients: (``_COEFFICIENTS``,) float64, see :meth:`step_coefficients`.
            ddim_noise / refill: (B, N, 4) standard normal draws.

        Returns:
            x_next (B, N, 4) and the model outputs (B, N, ...) (logits, abs xyxy boxes, extras).
        """
        outputs = denoise_fn(signal_to_boxes(x, image_whwh, self.snr_scale), t)
        x0 = boxes_to_signal(outputs["pred_boxes"].to(x.dtype), image_whwh, self.snr_scale)
        x0 = torch.clamp(x0, min=-self.snr_scale, max=self.snr_scale)
        # ε̂ from the unclamped x as in the parity mode, in float64 like its ᾱ buffer.
        eps = (coefficients[0] * x.double() - x0.double()) / coefficients[1]
        scores = self.proposal_scores(outputs["pred_logits"])
        x_next = masked_renew_and_step(
            x0, eps.to(x.dtype), scores, self.renewal_threshold,
            (coefficients[2], coefficients[3], coefficients[4]), ddim_noise, refill,
            renew=self.box_renewal, update=self.update,
        )  # fmt: skip
        return x_next, outputs

    def _step_fn(self, device: torch.device) -> Callable:
        if not self.compile_step:
            return self.step
        if device.type not in self._compiled:
            mode = "reduce-overhead" if device.type == "cuda" and self.compile_backend == "inductor" else None
            self._compiled[device.type] = torch.compile(
                self.step, fullgraph=True, backend=self.compile_backend, mode=mode
            )
        return self._compiled[device.type]

    def sampling_schedule(self, alphas_cumprod: Tensor, device: torch.device) -> SamplingSchedule:
        """The time pairs, step coefficients and timesteps of an S-step run, on ``device``.

        Reads ᾱ on the host (:meth:`host_alphas`), so a graph exported with ``torch.export``
        computes it beforehand and holds the result as constants (``diffusiondet.export``).
        """
        pairs = ddim_time_pairs(alphas_cumprod.shape[0], self.steps)
        alphas = self.host_alphas(alphas_cumprod)
        coefficients = torch.tensor(
            [self.step_coefficients(alphas, t, t_next) for t, t_next in pairs],
            dtype=torch.float64,
        ).to(device)  # (S, _COEFFICIENTS), one host-to-device copy per batch
        times = torch.tensor([t for t, _ in pairs], dtype=torch.long).to(device)  # (S,)
        return SamplingSchedule(pairs, coefficients, times)

    def sample_candidates(
        self,
        denoise_fn: DenoiseFn,
        alphas_cumprod: Tensor,
        image_whwh: Tensor,
        num_boxes: int,
        rng: Optional[RandomSource] = None,
        per_image_rng: Optional[Sequence[RandomSource]] = None,
        schedule: Optional[SamplingSchedule] = None,
    ) -> List[List[CandidateDict]]:
        """Run the masked DDIM loop; arguments as :meth:`DDIMBoxSampler.sample_candidates`, plus
        ``schedule``: a precomputed :meth:`sampling_schedule` (default: computed here).

        Returns:
            per image a one-element list: the candidates of every ensembled call, concatenated
            call by call (M = C·N rows, each call's rows sorted by score), views of (B, M, ...)
            tensors; :meth:`select_batch` takes them all at once.
        """
        batch, device = image_whwh.shape[0], image_whwh.device
        image_whwh, shared_rng = sampling_inputs(image_whwh, rng, per_image_rng)
        dtype = image_whwh.dtype

        def draw(count: int) -> List[Tensor]:
            """``count`` draws of (B, N, 4); per-image sources draw image by image, in order."""
            if per_image_rng is None:  # one kernel per draw, not one per image
                return [shared_rng.randn((batch, num_boxes, 4)).to(device, dtype) for _ in range(count)]
            per_image = [[s.randn((num_boxes, 4)) for _ in range(count)] for s in per_image_rng]
            return [torch.stack([d[i] for d in per_image]).to(device, dtype) for i in range(count)]

        if schedule is None:
            schedule = self.sampling_schedule(alphas_cumprod, device)
        pairs, coefficients, times = schedule
        step_fn = self._step_fn(device)
        (x,) = draw(1)  # (B, N, 4)
        calls: List[CandidateDict] = []
        for i, (t, t_next) in enumerate(pairs):
            if self.skip_unused_calls and not self._ensembles_call(t_next):
                break
            last = t_next < 0
            if last:
                noise = [torch.zeros_like(x)] * 2
            elif self.box_renewal:
                noise = draw(2)
            else:  # nothing is refilled: no refill draw, as in the parity mode
                noise = draw(1) + [torch.zeros_like(x)]
            x_next, outputs = step_fn(
                denoise_fn, x, times[i : i + 1], image_whwh, coefficients[i], *noise
            )
            if self._ensembles_call(t_next):
                extras = per_proposal_extras(outputs, batch, num_boxes)
                calls.append(
                    topk_candidate_fields(
                        outputs["pred_logits"], outputs["pred_boxes"], extras, num_boxes,
                        self.use_focal,
                    )
                )  # fmt: skip
            if last:
                break
            x = x_next
        merged = {name: torch.cat([c[name] for c in calls], dim=1) for name in calls[0]}
        return [[{name: value[b] for name, value in merged.items()}] for b in range(batch)]

    def select_batch(self, candidates: List[List[CandidateDict]]) -> List[CandidateDict]:
        """Class-aware NMS of all images at once (image-offset class ids) and the cap.

        Args:
            candidates: the output of :meth:`sample_candidates` (one dict per image, M rows).

        Returns:
            B detection dicts; with NMS, rows sorted by score descending.
        """
        per_image = [image_candidates[0] for image_candidates in candidates]
        if not self.use_nms:
            return [self.select_detections([c]) for c in per_image]
        fields = {name: torch.stack([c[name] for c in per_image]) for name in per_image[0]}
        keep, counts = batched_class_nms(
            fields["boxes"], fields["scores"], fields["classes"], self.nms_threshold
        )  # the one host sync of the batch
        flat = {name: value.flatten(0, 1)[keep] for name, value in fields.items()}
        split = [dict(zip(flat, rows)) for rows in zip(*(v.split(counts) for v in flat.values()))]
        if self.detections_per_image > 0:
            split = [{k: v[: self.detections_per_image] for k, v in d.items()} for d in split]
        return split


def batched_class_nms(
    boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float
) -> Tuple[Tensor, List[int]]:
    """NMS per (image, class) group for a whole batch in one kernel call.

    Boxes of different groups are moved apart by a per-group offset, in float64 so that the
    offsets (up to groups × image size) leave the coordinates' float32 precision intact.

    Args:
        boxes: (B, M, 4) abs xyxy; scores: (B, M); classes: (B, M) long.
        iou_threshold: same-group boxes with IoU > threshold are suppressed.

    Returns:
        keep: (R,) indices into the flattened B·M rows, grouped by image in image order, each
        image's rows sorted by score descending; counts: R_b per image (Python ints).
    """
    batch, num = scores.shape
    image = torch.arange(batch, device=scores.device).repeat_interleave(num)  # (B·M,)
    flat_boxes = boxes.flatten(0, 1).double()
    num_classes = classes.max() + 1 if classes.numel() else 1
    group = image * num_classes + classes.flatten()
    span = flat_boxes.abs().max() * 2 + 1 if flat_boxes.numel() else 1.0
    shifted = flat_boxes + (group.double() * span)[:, None]
    keep = torchvision.ops.nms(shifted, scores.flatten().double(), iou_threshold)
    # nms returns rows by decreasing score over the batch; a stable sort by image keeps that
    # order inside each image.
    keep = keep[torch.sort(image[keep], stable=True).indices]
    counts = torch.bincount(image[keep], minlength=batch).tolist()
    return keep, counts
