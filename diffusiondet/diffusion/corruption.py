"""Training-time corruption of one image's ground-truth boxes (DiffusionDet paper, arXiv
2211.09788, Sec. 3.3 "Ground truth boxes padding" and "Box corruption"; Alg. 1).

Shape legend: G ground-truth boxes of the image, N proposals (NUM_PROPOSALS), T timesteps.
Box formats: ``gt_cxcywh`` is normalised cxcywh in [0, 1]; ``x_0`` / ``x_t`` / ``noise`` are in
signal space ``(b * 2 - 1) * scale``.

Every random tensor is drawn through a ``RandomSource`` in a fixed order (t, noise, padding) so
that the official recording can be replayed exactly.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from .box_signal import normalized_cxcywh_to_signal
from .random_source import RandomSource
from .schedule import q_sample

# The paper's Table 4b; "gaussian_concat" is what the official code uses.
PADDING_STRATEGIES = ("gaussian_concat", "uniform_concat", "full_image_concat", "repeat")

# Placeholder boxes must keep a positive size so xyxy conversion never gives inverted boxes.
_MIN_PLACEHOLDER_SIZE = 1e-4


class CorruptedBoxes(NamedTuple):
    """Result of ``corrupt_boxes`` for one image.

    Attributes:
        x_t: (N, 4) noisy boxes in signal space, clamped to [-scale, scale].
        t: (1,) long timestep.
        noise: (N, 4) the Gaussian noise ε (not used by the DiffusionDet loss).
        x_0: (N, 4) padded clean boxes in signal space.
    """

    x_t: Tensor
    t: Tensor
    noise: Tensor
    x_0: Tensor


def _full_image_box(like: Tensor) -> Tensor:
    return like.new_tensor([0.5, 0.5, 1.0, 1.0])


def _placeholders(
    num: int, strategy: str, placeholder_std: float, rng: RandomSource, like: Tensor
) -> Tensor:
    """(num, 4) normalised cxcywh placeholder boxes for the ``*_concat`` strategies."""
    if strategy == "full_image_concat":
        return _full_image_box(like).expand(num, 4).clone()
    if strategy == "gaussian_concat":
        boxes = rng.randn((num, 4)).to(like) * placeholder_std + 0.5
    else:  # uniform_concat
        boxes = rng.rand((num, 4)).to(like)
    boxes[:, 2:] = torch.clamp(boxes[:, 2:], min=_MIN_PLACEHOLDER_SIZE)
    return boxes


def _repeat_to(gt_cxcywh: Tensor, num_proposals: int, rng: RandomSource) -> Tensor:
    """Repeat each of the G boxes ⌊N/G⌋ or ⌊N/G⌋+1 times (random which) -> (N, 4), GT order kept."""
    num_gt = gt_cxcywh.shape[0]
    counts = torch.full((num_gt,), num_proposals // num_gt, dtype=torch.long)
    lucky = rng.randperm(num_gt).cpu()[: num_proposals % num_gt]
    counts[lucky] += 1
    return torch.repeat_interleave(gt_cxcywh, counts.to(gt_cxcywh.device), dim=0)


def pad_boxes(
    gt_cxcywh: Tensor,
    num_proposals: int,
    strategy: str,
    placeholder_std: float,
    rng: RandomSource,
) -> Tensor:
    """Bring an image's GT boxes to exactly N boxes.

    * no GT: one fake GT (0.5, 0.5, 1, 1) stands in (diffusion input only, never a target);
    * G > N: a random subset of N GT boxes (``rng.randperm``), in their original order;
    * G == N: the GT as is;
    * G < N: the GT first, then N − G boxes made by ``strategy`` (see ``PADDING_STRATEGIES``):
      gaussian_concat: each coordinate ~ N(0.5, placeholder_std²), w/h clipped ≥ 1e-4
      (``rng.randn((N − G, 4))``); uniform_concat: each coordinate ~ U(0, 1), w/h clipped ≥ 1e-4
      (``rng.rand((N − G, 4))``); full_image_concat: copies of (0.5, 0.5, 1, 1) (no draw);
      repeat: each GT ⌊N/G⌋ or ⌊N/G⌋+1 times, the +1 going to random GTs (``rng.randperm(G)``).

    Args:
        gt_cxcywh: (G, 4) normalised cxcywh.
        num_proposals: N.
        strategy: one of ``PADDING_STRATEGIES``.
        placeholder_std: std of the gaussian placeholders (1/6 officially).
        rng: source of the draws.

    Returns:
        (N, 4) normalised cxcywh, ``gt_cxcywh``' dtype and device.
    """
    if strategy not in PADDING_STRATEGIES:
        raise ValueError(f"Unknown padding strategy {strategy!r}; allowed: {PADDING_STRATEGIES}")
    if num_proposals < 1:
        raise ValueError(f"num_proposals must be >= 1, got {num_proposals}")
    if gt_cxcywh.shape[0] == 0:
        gt_cxcywh = _full_image_box(gt_cxcywh)[None]
    num_gt = gt_cxcywh.shape[0]
    if num_gt > num_proposals:
        chosen = rng.randperm(num_gt)[:num_proposals].to(gt_cxcywh.device)
        return gt_cxcywh[torch.sort(chosen).values]
    if num_gt == num_proposals:
        return gt_cxcywh
    if strategy == "repeat":
        return _repeat_to(gt_cxcywh, num_proposals, rng)
    extra = _placeholders(num_proposals - num_gt, strategy, placeholder_std, rng, gt_cxcywh)
    return torch.cat([gt_cxcywh, extra], dim=0)


def corrupt_boxes(
    gt_cxcywh: Tensor,
    num_proposals: int,
    alphas_cumprod: Tensor,
    scale: float,
    strategy: str,
    placeholder_std: float,
    rng: RandomSource,
) -> CorruptedBoxes:
    """Pad one image's GT to N boxes and diffuse them to a random timestep.

    Draw order (matches the official recording): ``rng.randint(T, (1,))`` for t, then
    ``rng.randn((N, 4))`` for ε, then the padding draws of ``pad_boxes``.

    Args:
        gt_cxcywh: (G, 4) normalised cxcywh GT boxes of the image (G may be 0).
        num_proposals: N.
        alphas_cumprod: (T,) ᾱ (float64 buffer); q-sampling runs in its dtype.
        scale: signal scale s.
        strategy: padding strategy, one of ``PADDING_STRATEGIES``.
        placeholder_std: std of gaussian placeholders.
        rng: source of the draws.

    Returns:
        ``CorruptedBoxes`` with x_t, t, noise, x_0 in ``gt_cxcywh``' dtype and device.
    """
    num_timesteps = alphas_cumprod.shape[0]
    device = gt_cxcywh.device
    t = rng.randint(num_timesteps, (1,)).to(device=device, dtype=torch.long)
    noise = rng.randn((num_proposals, 4)).to(gt_cxcywh)
    padded = pad_boxes(gt_cxcywh, num_proposals, strategy, placeholder_std, rng)
    x_0 = normalized_cxcywh_to_signal(padded, scale)
    x_t = q_sample(x_0, t, alphas_cumprod, noise)
    x_t = torch.clamp(x_t, min=-scale, max=scale)
    return CorruptedBoxes(x_t=x_t, t=t, noise=noise, x_0=x_0)
