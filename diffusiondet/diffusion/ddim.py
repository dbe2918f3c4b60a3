"""DDIM sampling math (Song et al. 2021) as DiffusionDet uses it (DiffusionDet paper, arXiv
2211.09788, Sec. 3.4 "Sampling step" and Alg. 2; time pairs as in the official implementation).

Shape legend: B images, N proposals, S sampling steps, T training timesteps.
All box tensors are in signal space ``(b * 2 - 1) * scale``.

Notation (variable -> paper symbol), in the style of diffusers' ``DDIMScheduler.step``:

    x0                 -> x̂_0, the network's prediction of the clean boxes
    eps                -> ε̂, the noise implied by x_t and x̂_0
    alpha_cumprod_t    -> ᾱ_t (α_t in the DDIM paper)
    alpha_cumprod_next -> ᾱ_{t_next}, the (earlier) timestep being sampled
    sigma              -> σ_t, eq. (16): η · √((1 − ᾱ_t/ᾱ_next)(1 − ᾱ_next)/(1 − ᾱ_t))
    direction_coef     -> c = √(1 − ᾱ_next − σ_t²), weight of the "direction pointing to x_t"
    eta                -> η (1.0 in DiffusionDet: DDPM-like stochasticity)
"""
import math
from typing import List, Tuple, Union

import torch
from torch import Tensor

from .schedule import extract_per_sample

Scalar = Union[float, Tensor]


def ddim_time_pairs(num_timesteps: int, steps: int) -> List[Tuple[int, int]]:
    """(t, t_next) pairs visited by an S-step sampler, from T−1 down to −1 (= "done").

    times = int-truncated float32 linspace(−1, T−1, S+1), reversed, consecutive pairs; float32
    is used on purpose so that truncation matches the official code for every S.
    E.g. T = 1000, S = 4: [(999, 749), (749, 499), (499, 249), (249, -1)].

    Args:
        num_timesteps: T.
        steps: S, 1 <= S <= T.

    Returns:
        list of S (t, t_next) int pairs; the last has t_next = -1.
    """
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    times = torch.linspace(-1, num_timesteps - 1, steps + 1, dtype=torch.float32)
    times = list(reversed(times.int().tolist()))
    return list(zip(times[:-1], times[1:]))


def predict_noise_from_start(x_t: Tensor, t: Tensor, x0: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """ε̂ = (√(1/ᾱ_t) · x_t − x̂_0) / √(1/ᾱ_t − 1).

    Args:
        x_t: (B, N, 4) current sample (DiffusionDet passes it UNclamped).
        t: (B,) long timesteps.
        x0: (B, N, 4) predicted clean boxes x̂_0.
        alphas_cumprod: (T,) ᾱ; arithmetic runs in its dtype.

    Returns:
        (B, N, 4) ε̂ in ``x_t``' dtype and device.
    """
    alpha_bar = extract_per_sample(alphas_cumprod.to(x_t.device), t, x_t.dim())
    work_dtype = alpha_bar.dtype
    eps = (torch.sqrt(1.0 / alpha_bar) * x_t.to(work_dtype) - x0.to(work_dtype)) / torch.sqrt(
        1.0 / alpha_bar - 1.0
    )
    return eps.to(x_t.dtype)


def _sqrt(value: Scalar) -> Scalar:
    if isinstance(value, Tensor):
        return torch.sqrt(torch.clamp(value, min=0.0))
    return math.sqrt(max(value, 0.0))


def ddim_coefficients(
    alpha_cumprod_t: Scalar, alpha_cumprod_next: Scalar, eta: float
) -> Tuple[Scalar, Scalar, Scalar]:
    """Coefficients of one DDIM update x_next = √ᾱ_next·x̂_0 + c·ε̂ + σ·z.

    Args:
        alpha_cumprod_t: ᾱ_t (float or tensor broadcastable to the samples).
        alpha_cumprod_next: ᾱ_next.
        eta: η.

    Returns:
        (√ᾱ_next, c, σ), floats or tensors like the inputs. E.g. T = 1000 cosine, 999 -> 749,
        η = 1: (0.380, ≈1e-4, 0.925).
    """
    sigma = eta * _sqrt(
        (1 - alpha_cumprod_t / alpha_cumprod_next)
        * (1 - alpha_cumprod_next)
        / (1 - alpha_cumprod_t)
    )
    # Mathematically >= 0 for eta <= 1; clamping inside _sqrt absorbs rounding (c is ~1e-4 at 999).
    direction_coef = _sqrt(1 - alpha_cumprod_next - sigma**2)
    return _sqrt(alpha_cumprod_next), direction_coef, sigma


def ddim_step(
    x0: Tensor,
    eps: Tensor,
    alpha_cumprod_t: Scalar,
    alpha_cumprod_next: Scalar,
    eta: float,
    noise: Tensor,
) -> Tensor:
    """One DDIM update, eq. (12) of the DDIM paper with σ from eq. (16).

    x_next = √ᾱ_next · x̂_0 + √(1 − ᾱ_next − σ²) · ε̂ + σ · z

    Args:
        x0: (B, N, 4) x̂_0 (DiffusionDet clamps it to ±scale before this call).
        eps: (B, N, 4) ε̂.
        alpha_cumprod_t: ᾱ_t, float or tensor broadcastable to (B, N, 4).
        alpha_cumprod_next: ᾱ_next, same kind.
        eta: η.
        noise: (B, N, 4) z ~ N(0, I).

    Returns:
        (B, N, 4) x_next in ``x0``' dtype.
    """
    sqrt_alpha_next, direction_coef, sigma = ddim_coefficients(
        alpha_cumprod_t, alpha_cumprod_next, eta
    )
    x_next = sqrt_alpha_next * x0 + direction_coef * eps + sigma * noise
    return x_next.to(x0.dtype)
