"""Mask branch: FPN levels → shared mask feature F_mask (the DiffusionInst paper's mask branch,
arXiv 2212.02773, with the levels and layers of the official implementation).

Shape legend: B images, C FPN channels, H_l×W_l the map of level l (finest first), D branch width
(128 officially), O mask-feature channels (8 officially).

Each level gets one 3×3 conv-norm-ReLU ("refine"); coarser levels are upsampled to the finest
level with :func:`aligned_bilinear` and summed; a tower of 3×3 conv-norm-ReLU blocks and a final
1×1 conv gives F_mask at the finest level's stride. The module layout (``nn.Sequential`` per
block) reproduces the official state-dict keys ``mask_refine.{i}.{0,1}.…`` and
``mask_head.{j}.{0,1}.…`` / ``mask_head.{num_convs}.{weight,bias}``.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from torch import nn


def aligned_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample by an integer factor so that output pixel centres align with the input grid.

    Replicate-pad one pixel right/bottom, bilinear resize (align_corners=True) to
    (f·h + 1, f·w + 1), replicate-pad f//2 pixels left/top, then crop to (f·h, f·w). The input
    pixel (i, j) then lands on output (f·i + f//2, f·j + f//2) as for a stride-f sampling grid.

    Args:
        x: (B, C, h, w).
        factor: positive int upsampling factor.

    Returns:
        (B, C, factor·h, factor·w); ``x`` itself when factor == 1.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, h, w), got shape {tuple(x.shape)}")
    if factor == 1:
        return x
    h, w = x.shape[2:]
    x = F.pad(x, pad=(0, 1, 0, 1), mode="replicate")
    x = F.interpolate(x, size=(factor * h + 1, factor * w + 1), mode="bilinear", align_corners=True)
    x = F.pad(x, pad=(factor // 2, 0, factor // 2, 0), mode="replicate")
    return x[:, :, : factor * h, : factor * w]


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3×3 conv (bias only when there is no norm to absorb it), norm, ReLU as one Sequential."""
    norm_layer = get_norm(norm, out_channels)
    conv = Conv2d(in_channels, out_channels, 3, padding=1, bias=norm_layer is None)
    layers = [conv] if norm_layer is None else [conv, norm_layer]
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


def build_mask_refine(
    in_channels: int, channels: int, num_levels: int, norm: str = "BN"
) -> nn.ModuleList:
    """One conv-norm-ReLU block per FPN level used by the mask branch.

    Args:
        in_channels: FPN width C.
        channels: branch width D.
        num_levels: number of FPN levels fed in (3 officially: p2, p3, p4).
        norm: detectron2 norm name ("BN", "SyncBN", "GN", …) or "" for none (then the conv has a
            bias and the block is Sequential(conv, ReLU), so keys shift to ``{i}.0.bias``).

    Returns:
        ModuleList of ``num_levels`` Sequential(conv, norm, ReLU); each maps (B, C, H, W) to
        (B, D, H, W).
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    return nn.ModuleList(
        [_conv_norm_relu(in_channels, channels, norm) for _ in range(num_levels)]
    )


def build_mask_tower(
    channels: int, num_convs: int, out_channels: int, norm: str = "BN"
) -> nn.Sequential:
    """Tower applied to the summed levels: num_convs conv-norm-ReLU blocks, then a 1×1 conv.

    Args:
        channels: branch width D.
        num_convs: number of 3×3 blocks (4 officially).
        out_channels: mask-feature channels O (8 officially).
        norm: as for :func:`build_mask_refine`.

    Returns:
        Sequential mapping (B, D, H, W) → (B, O, H, W); keys ``{j}.0.weight``, ``{j}.1.*`` and
        ``{num_convs}.weight/bias``.
    """
    blocks = [_conv_norm_relu(channels, channels, norm) for _ in range(num_convs)]
    blocks.append(Conv2d(channels, out_channels, 1, bias=True))
    return nn.Sequential(*blocks)


def mask_branch_forward(
    refine: nn.ModuleList,
    tower: nn.Module,
    features: Sequence[torch.Tensor],
    strides: Sequence[int],
) -> torch.Tensor:
    """Compute F_mask from the first ``len(refine)`` FPN levels.

    Args:
        refine: from :func:`build_mask_refine`; only ``features[:len(refine)]`` are read, so
            coarser levels (p5) may be passed or omitted.
        tower: from :func:`build_mask_tower`.
        features: list of (B, C, H_l, W_l), finest first.
        strides: stride of each entry of ``features`` (e.g. [4, 8, 16, 32]).

    Returns:
        (B, O, H_0, W_0) mask features at the finest level's stride.
    """
    num_levels = len(refine)
    if len(features) < num_levels or len(strides) < num_levels:
        raise ValueError(
            f"the mask branch needs {num_levels} levels, got {len(features)} features and "
            f"{len(strides)} strides"
        )
    base = refine[0](features[0])
    for level in range(1, num_levels):
        if strides[level] % strides[0] != 0:
            raise ValueError(
                f"stride {strides[level]} of level {level} is not a multiple of the finest "
                f"stride {strides[0]}"
            )
        factor = strides[level] // strides[0]
        up = aligned_bilinear(refine[level](features[level]), factor)
        if up.shape[-2:] != base.shape[-2:]:
            # Holds when the padded image size is a multiple of the coarsest stride used.
            raise ValueError(
                f"level {level} ({tuple(features[level].shape[-2:])}) upsampled ×{factor} gives "
                f"{tuple(up.shape[-2:])}, not the finest level's {tuple(base.shape[-2:])}; pad "
                f"the image to a multiple of {strides[level]}"
            )
        base = base + up
    return tower(base)
