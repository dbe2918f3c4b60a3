"""Box renewal + DDIM step, per image and batched (DiffusionDet paper, arXiv 2211.09788,
Sec. 3.4 "Box renewal"; Alg. 2), compacting or masked.

Shape legend: B images, N proposals. Box tensors are in signal space.

The official sampler takes the renewal mask from image 0 and applies it to the whole batch; here
each image keeps its own confident boxes, so a batch gives the same result as its images alone
(given per-image random draws).
"""
from typing import Callable, Tuple

import torch
from torch import Tensor

from .ddim import Scalar, ddim_step

# draw(image_index, shape) -> standard normal tensor of that shape for that image.
DrawFn = Callable[[int, Tuple[int, ...]], Tensor]

# How kept proposals move to the next timestep: "ddim" (DDIM update, official) or "x0" (the
# clamped prediction x̂_0 as it is, paper Table 4c "without DDIM"). Mirrors
# ``diffusiondet.options.SAMPLER_UPDATES``; repeated here because this package imports torch only.
STEP_UPDATES = ("ddim", "x0")


def compact_kept_first(keep: Tensor) -> Tuple[Tensor, Tensor]:
    """Order that moves kept proposals to the front, each group in original order.

    Args:
        keep: (B, N) bool.

    Returns:
        order: (B, N) long, indices into N (kept first, then dropped; both stable).
        num_kept: (B,) long.
    """
    # A stable sort on "dropped" (0 kept, 1 dropped) keeps the original order inside each group.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return order, keep.sum(dim=1)


def renew_and_step(
    x0: Tensor,
    eps: Tensor,
    scores: Tensor,
    threshold: float,
    alpha_t: Scalar,
    alpha_next: Scalar,
    eta: float,
    draw: DrawFn,
    renew: bool = True,
    update: str = "ddim",
) -> Tensor:
    """Keep the confident proposals of each image, DDIM-step them, refill with fresh noise.

    For image b with k_b proposals scoring > ``threshold`` (all N when ``renew`` is False):
    x_next[b, :k_b] = ddim_step(kept x̂_0, kept ε̂, noise = draw(b, (k_b, 4))) in original order
    (``update="x0"``: the kept x̂_0 themselves; the DDIM noise is still drawn and unused);
    x_next[b, k_b:] = draw(b, (N − k_b, 4)) (fresh N(0, I) boxes). Both draws are made for every
    image and every call, even when empty, so draw counts are fixed (2 per image per step) and a
    seed gives the same refills under either update; image b's draws come before image b + 1's.

    Args:
        x0: (B, N, 4) x̂_0 in signal space (clamped).
        eps: (B, N, 4) ε̂.
        scores: (B, N) confidence of each proposal (max class probability).
        threshold: renewal threshold (0.5 officially); strict ``>``.
        alpha_t: ᾱ_t (float or 0-dim tensor).
        alpha_next: ᾱ_next.
        eta: DDIM η.
        draw: ``draw(b, shape)`` returns standard normal samples for image b (any dtype/device;
            cast to ``x0``'s).
        renew: False keeps every proposal (no refill).
        update: one of ``STEP_UPDATES``.

    Returns:
        (B, N, 4) next sample x_{t_next} in ``x0``' dtype.
    """
    if update not in STEP_UPDATES:
        raise ValueError(f"update must be one of {STEP_UPDATES}, got {update!r}")
    batch, num_proposals = x0.shape[:2]
    if renew:
        keep = scores > threshold
    else:
        keep = torch.ones(batch, num_proposals, dtype=torch.bool, device=x0.device)
    order, num_kept = compact_kept_first(keep)
    gather_index = order.unsqueeze(-1).expand_as(x0)
    x0_kept_first = torch.gather(x0, 1, gather_index)  # (B, N, 4)
    eps_kept_first = torch.gather(eps, 1, gather_index)  # (B, N, 4)

    # Only the draws are per image: their sizes differ and each image owns its stream.
    noise_rows = []
    for b, k in enumerate(num_kept.tolist()):
        ddim_noise = draw(b, (k, 4)).to(x0)
        refill = draw(b, (num_proposals - k, 4)).to(x0)
        noise_rows.append(torch.cat([ddim_noise, refill], dim=0))
    noise = torch.stack(noise_rows)  # (B, N, 4)

    if update == "ddim":
        stepped = ddim_step(x0_kept_first, eps_kept_first, alpha_t, alpha_next, eta, noise)
    else:
        stepped = x0_kept_first  # "without DDIM": the prediction is the next input
    slot = torch.arange(num_proposals, device=x0.device)
    is_kept_slot = (slot[None, :] < num_kept[:, None]).unsqueeze(-1)  # (B, N, 1)
    return torch.where(is_kept_slot, stepped, noise)


def masked_renew_and_step(
    x0: Tensor,
    eps: Tensor,
    scores: Tensor,
    threshold: float,
    coefficients: Tuple[Scalar, Scalar, Scalar],
    ddim_noise: Tensor,
    refill: Tensor,
    renew: bool = True,
    update: str = "ddim",
) -> Tensor:
    """Box renewal with N fixed: ``where(keep, DDIM step of x̂_0, fresh noise)``, slot by slot.

    The graph-friendly counterpart of :func:`renew_and_step`: no compaction, no per-image sizes,
    no host synchronisation, so it can be captured in one graph. The head treats proposals as an
    unordered set, so leaving a renewed box in its slot instead of moving it to the back changes
    nothing but the draw layout: every slot gets a DDIM noise and a refill draw, used or not.
    When every proposal is kept, ``ddim_noise`` plays the role of :func:`renew_and_step`'s first
    draw and both functions agree.

    Args:
        x0: (B, N, 4) x̂_0 in signal space (clamped).
        eps: (B, N, 4) ε̂.
        scores: (B, N) confidence of each proposal.
        threshold: renewal threshold; strict ``>`` keeps.
        coefficients: (√ᾱ_next, c, σ) of :func:`ddim_coefficients`, floats or 0-dim tensors (a
            compiled step then does not specialise on their values).
        ddim_noise: (B, N, 4) standard normal, the DDIM noise of each slot.
        refill: (B, N, 4) standard normal, the fresh box of each renewed slot.
        renew: False keeps every proposal.
        update: one of ``STEP_UPDATES``.

    Returns:
        (B, N, 4) next sample in ``x0``' dtype.
    """
    if update not in STEP_UPDATES:
        raise ValueError(f"update must be one of {STEP_UPDATES}, got {update!r}")
    if update == "ddim":
        sqrt_alpha_next, direction_coef, sigma = coefficients
        stepped = sqrt_alpha_next * x0 + direction_coef * eps + sigma * ddim_noise.to(x0)
        stepped = stepped.to(x0.dtype)
    else:
        stepped = x0
    if not renew:
        return stepped
    keep = (scores > threshold).unsqueeze(-1)  # (B, N, 1)
    return torch.where(keep, stepped, refill.to(x0))
