"""Timestep embedding shared by all refinement stages (DiffusionDet paper, arXiv 2211.09788,
Sec. 3.2: the decoder knows the step through a timestep embedding; the sinusoid and MLP widths
are the ones of the official implementation).

Shape legend: B images, D = hidden_dim, E = 4·D (time-MLP width).
"""
import math

import torch
from torch import nn

__all__ = ["SinusoidalTimeEmbedding", "build_time_mlp"]


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoid of the raw integer timestep (0..T-1, not normalised).

    ``emb = [sin(t·ω_0..ω_{h-1}), cos(t·ω_0..ω_{h-1})]`` with ``h = dim // 2`` and
    ``ω_k = exp(-k·ln(10000) / (h - 1))`` (all sines first, then all cosines).
    """

    def __init__(self, dim: int):
        """
        Args:
            dim: embedding width D (even, ≥ 4).
        """
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"SinusoidalTimeEmbedding needs an even dim >= 4, got {dim}")
        half = dim // 2
        # Built in float32 exactly as the official code does: t reaches 999, so a float64-rounded
        # ω would shift the phase by ~1e-4 rad and break checkpoint parity.
        step = math.log(10000.0) / (half - 1)
        frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
        # Non-persistent: official checkpoints have no key here, yet .to()/.double() must move it.
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """
        Args:
            t: (B,) timesteps, integer or float dtype.

        Returns:
            (B, D) embedding in the buffer's dtype.
        """
        angles = t.to(self.frequencies.dtype)[:, None] * self.frequencies[None, :]  # (B, D/2)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def build_time_mlp(hidden_dim: int) -> nn.Sequential:
    """``[sinusoid(D), Linear D→4D, GELU, Linear 4D→4D]``: maps t (B,) to (B, 4D).

    The Sequential indices (1 and 3 hold the parameters) are the official state-dict names
    ``time_mlp.{1,3}.*``.
    """
    time_dim = hidden_dim * 4
    return nn.Sequential(
        SinusoidalTimeEmbedding(hidden_dim),
        nn.Linear(hidden_dim, time_dim),
        nn.GELU(),
        nn.Linear(time_dim, time_dim),
    )
