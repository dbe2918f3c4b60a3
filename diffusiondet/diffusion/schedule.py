"""Noise schedule of DiffusionDet: cosine betas, the derived DDPM buffers and the forward process.

Shape legend: T timesteps, B images, N proposals. Boxes handled here are in signal space,
``(b * 2 - 1) * scale`` with b normalised cxcywh in [0, 1].

The schedule is computed in float64 (as the official code does) so that recomputed buffers match
official checkpoints bit-for-bit; consumers cast results back to their own dtype.
"""
import math
from collections import OrderedDict

import torch
from torch import Tensor

# Names and order of the persistent float64 buffers in official checkpoints (the official
# implementation registers all twelve, though sampling reads only the ᾱ-derived ones).
DIFFUSION_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def cosine_beta_schedule(num_timesteps: int, s: float = 0.008) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), clipped at 0.999.

    f(i) = cos²(((i / T) + s) / (1 + s) · π / 2) for i = 0..T; ᾱ'(i) = f(i) / f(0);
    β_t = clip(1 − ᾱ'(t + 1) / ᾱ'(t), 0, 0.999).

    Args:
        num_timesteps: T.
        s: small offset that keeps β_0 from being vanishingly small.

    Returns:
        float64 tensor (T,) of betas.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    steps = torch.linspace(0, num_timesteps, num_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / num_timesteps) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - (alphas_cumprod[1:] / alphas_cumprod[:-1])
    return torch.clip(betas, 0, 0.999)


def diffusion_buffers(betas: Tensor) -> "OrderedDict[str, Tensor]":
    """The 12 DDPM buffers the official detector registers, in checkpoint order.

    Args:
        betas: (T,) betas, normally float64 from ``cosine_beta_schedule``.

    Returns:
        OrderedDict name -> (T,) tensor in ``betas``' dtype, keys = ``DIFFUSION_BUFFER_NAMES``.
        Only ᾱ, √ᾱ, √(1−ᾱ), √(1/ᾱ) and √(1/ᾱ−1) are used by DiffusionDet; the posterior
        buffers exist so that official checkpoints load key-for-key.
    """
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    buffers = OrderedDict()
    buffers["betas"] = betas
    buffers["alphas_cumprod"] = alphas_cumprod
    buffers["alphas_cumprod_prev"] = alphas_cumprod_prev
    buffers["sqrt_alphas_cumprod"] = torch.sqrt(alphas_cumprod)
    buffers["sqrt_one_minus_alphas_cumprod"] = torch.sqrt(1.0 - alphas_cumprod)
    buffers["log_one_minus_alphas_cumprod"] = torch.log(1.0 - alphas_cumprod)
    buffers["sqrt_recip_alphas_cumprod"] = torch.sqrt(1.0 / alphas_cumprod)
    buffers["sqrt_recipm1_alphas_cumprod"] = torch.sqrt(1.0 / alphas_cumprod - 1)
    buffers["posterior_variance"] = posterior_variance
    # The posterior variance is 0 at t = 0; clip before the log to stay finite.
    buffers["posterior_log_variance_clipped"] = torch.log(posterior_variance.clamp(min=1e-20))
    buffers["posterior_mean_coef1"] = (
        betas * torch.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    )
    buffers["posterior_mean_coef2"] = (
        (1.0 - alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - alphas_cumprod)
    )
    return buffers


def extract_per_sample(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """Gather ``values[t]`` and append singleton dims so it broadcasts over a sample tensor.

    Args:
        values: (T,) schedule values.
        t: (B,) long timesteps.
        ndim: number of dims of the tensor the result must broadcast against, e.g. 3 for (B, N, 4).

    Returns:
        (B, 1, ..., 1) with ``ndim`` dims, in ``values``' dtype, on ``values``' device.
    """
    gathered = values[t.to(values.device)]
    return gathered.reshape(gathered.shape + (1,) * (ndim - gathered.dim()))


def q_sample(x0: Tensor, t: Tensor, alphas_cumprod: Tensor, noise: Tensor) -> Tensor:
    """Forward process: x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.

    Args:
        x0: (B, N, 4) clean boxes in signal space (any leading shape whose first dim is B).
        t: (B,) long timesteps.
        alphas_cumprod: (T,) ᾱ, any float dtype; the arithmetic runs in this dtype.
        noise: ε, same shape as ``x0``.

    Returns:
        x_t, same shape, dtype and device as ``x0`` (not clamped).
    """
    alphas_cumprod = alphas_cumprod.to(x0.device)
    alpha_bar = extract_per_sample(alphas_cumprod, t, x0.dim())
    x_t = torch.sqrt(alpha_bar) * x0.to(alpha_bar.dtype) + torch.sqrt(
        1.0 - alpha_bar
    ) * noise.to(alpha_bar.dtype)
    return x_t.to(x0.dtype)
