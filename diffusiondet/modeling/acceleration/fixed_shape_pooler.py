"""Multi-level RoIAlign with static shapes and no host synchronisation (compile / CUDA-graph safe).

Shape legend: B images, N boxes per image, M = B·N RoIs (image-major), C channels, R pooled side,
s sampling ratio, L feature levels, S = Σ_l H_l·W_l feature positions of one image,
T = 4·s² bilinear taps per output bin.

Why: detectron2's ``ROIPooler`` picks each box's level with ``nonzero`` (a data-dependent shape,
so a host sync) and runs one ``roi_align`` per level on the selected subset, which breaks
``torch.compile(fullgraph=True)`` and CUDA-graph capture. Here every box samples exactly T
positions of a single flat, channels-last table holding all levels; the level only changes *which*
positions (indices) and weights, never how many. The indices and weights follow torchvision's
``roi_align`` CPU/CUDA kernel step for step, so the result equals ``ROIPooler`` up to the order of
float additions (~1e-7).

Semantics kept from ``ROIPooler`` ("ROIAlignV2" / "ROIAlign", fixed ``sampling_ratio``):
boxes whose level is NaN (negative area, NaN coordinates) give all-zero rows; with one level
every finite box is pooled. Non-finite boxes always give zero rows (torchvision's result for
them is undefined). No gradient flows to the boxes (``roi_align`` has none either).
"""
import math
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FixedShapeROIPooler", "PackedFeatures", "assign_levels", "weighted_gather"]


class PackedFeatures(NamedTuple):
    """All levels of a batch in one table, built once and pooled from many times.

    table: (B·S, C), row ``b·S + base_l + y·W_l + x`` is level l at (y, x) of image b.
    levels: per level (base_l, H_l, W_l), Python ints (static for a given input size).
    """

    table: torch.Tensor
    levels: Tuple[Tuple[int, int, int], ...]
    batch: int


def assign_levels(
    boxes: torch.Tensor,
    min_level: int,
    max_level: int,
    canonical_box_size: int,
    canonical_level: int,
) -> torch.Tensor:
    """detectron2's ``assign_boxes_to_levels`` (same ops, same order) on a (..., 4) tensor.

    Returns:
        (...) float level index minus ``min_level``; NaN where detectron2 assigns no level
        (negative area or NaN coordinates: its int64 cast of NaN matches no level).
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    level = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_box_size + 1e-8))
    return torch.clamp(level, min=min_level, max=max_level) - min_level


def _per_level(level: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
    """Look up a per-level constant for each box; a ``where`` chain with Python scalars needs no
    host-to-device copy (a ``torch.tensor(values)`` would, which CUDA-graph capture forbids)."""
    out = torch.full_like(level, values[0])
    for index in range(1, len(values)):
        out = torch.where(level == index, values[index], out)
    return out


def _axis_taps(lo, hi, size, bins: int, ratio: int, aligned: bool):
    """Bilinear taps along one axis, exactly as torchvision's ``roi_align`` computes them.

    Args:
        lo, hi: (B, N) box edges already in level pixels (``box·scale``, not yet offset).
        size: (B, N) level extent along this axis (H_l or W_l), float.
    Returns:
        index (B, N, bins, ratio, 2) long coordinate of the (low, high) neighbour;
        weight (B, N, bins, ratio, 2) its weight, 0 for samples torchvision skips.
    """
    offset = 0.5 if aligned else 0.0
    start, end = lo - offset, hi - offset
    extent = end - start if aligned else torch.clamp(end - start, min=1.0)  # V1 forces ≥ 1 px
    bin_size = (extent / bins)[..., None, None]
    grid = torch.arange(bins, device=lo.device, dtype=lo.dtype)[:, None]
    sub = torch.arange(ratio, device=lo.device, dtype=lo.dtype) + 0.5
    # Same operation order as the kernel: start + p·bin + ((i + .5)·bin) / ratio.
    coord = start[..., None, None] + grid * bin_size + (sub * bin_size) / ratio
    size = size[..., None, None]
    # torchvision drops samples beyond one pixel outside the map, then clamps to [0, size-1]:
    # clamping *inside the box's own level* also keeps taps from reaching a neighbouring level.
    valid = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    coord = torch.minimum(torch.clamp(coord, min=0.0), size - 1)
    low = torch.floor(coord)
    high = torch.minimum(low + 1, size - 1)
    frac = coord - low
    weight = torch.stack([(1 - frac) * valid, frac * valid], dim=-1)
    return torch.stack([low, high], dim=-1).long(), weight


def weighted_gather(table: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, fused=None):
    """out[p] = Σ_t weight[p, t] · table[index[p, t]]: (B·S, C), (P, T), (P, T) → (P, C).

    On CPU (``fused``) ``embedding_bag`` does all T taps in one kernel, 6x faster than the loop
    (measured, one thread). Elsewhere the taps are gathered one by one: ``index_select`` and
    ``addcmul`` are plain kernels with a sync-free backward (``index_add``), whereas CUDA
    ``embedding_bag``'s backward sorts and has synced to the host (pytorch#82886), and inductor
    fuses the loop into one kernel anyway. Peak memory is a few (P, C) buffers, never T of them.
    Under ``torch.export`` the loop too: ONNX has no embedding_bag, and its translation is a Loop
    over the P bags, one iteration each at run time.
    """
    if fused is None:
        fused = table.device.type == "cpu" and not torch.compiler.is_exporting()
    if fused:
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")
    out = table.index_select(0, index[:, 0]) * weight[:, :1]
    for tap in range(1, index.shape[1]):
        out = out.addcmul(table.index_select(0, index[:, tap]), weight[:, tap : tap + 1])
    return out


class FixedShapeROIPooler(nn.Module):
    """Drop-in for detectron2's ``ROIPooler`` ("ROIAlignV2"/"ROIAlign") on (B, N, 4) boxes."""

    def __init__(
        self,
        output_size: Union[int, Sequence[int]],
        scales: Sequence[float],
        sampling_ratio: int,
        pooler_type: str = "ROIAlignV2",
        canonical_box_size: int = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            output_size: R, or (R_h, R_w).
            scales: 1/stride of each level, finest first, a factor-2 pyramid.
            sampling_ratio: samples per bin side; must be > 0 (the adaptive ``0`` of
                ``roi_align`` makes the sample count depend on the box, i.e. on data).
            pooler_type: "ROIAlignV2" (aligned) or "ROIAlign" (not aligned).
            canonical_box_size, canonical_level: FPN level rule, as in ``ROIPooler``.
        """
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ValueError(f"output_size must be a positive int or a pair, got {output_size!r}")
        if pooler_type not in ("ROIAlignV2", "ROIAlign"):
            raise ValueError(f"pooler_type must be 'ROIAlignV2' or 'ROIAlign', got {pooler_type!r}")
        if not isinstance(sampling_ratio, int) or sampling_ratio <= 0:
            raise ValueError(f"sampling_ratio must be an int > 0, got {sampling_ratio!r}")
        levels = [-math.log2(scale) for scale in scales]  # log2 raises ValueError for scale <= 0
        first = round(levels[0]) if levels else -1
        if first < 0 or any(not math.isclose(v, first + i) for i, v in enumerate(levels)):
            raise ValueError(f"scales must be 1/2^k for consecutive k >= 0, got {tuple(scales)}")
        if canonical_box_size <= 0:
            raise ValueError(f"canonical_box_size must be > 0, got {canonical_box_size}")
        self.output_size, self.scales = size, tuple(float(scale) for scale in scales)
        self.sampling_ratio, self.aligned = sampling_ratio, pooler_type == "ROIAlignV2"
        self.min_level, self.max_level = first, first + len(levels) - 1
        self.canonical_box_size, self.canonical_level = canonical_box_size, canonical_level

    def pack(self, features: List[torch.Tensor]) -> PackedFeatures:
        """Flatten L maps (B, C, H_l, W_l) into one (B·S, C) table (one copy of the features)."""
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature maps, got {len(features)}")
        batch, levels, base = features[0].shape[0], [], 0
        for feature in features:
            levels.append((base, feature.shape[2], feature.shape[3]))
            base += feature.shape[2] * feature.shape[3]
        # Channels last: a tap then reads C contiguous values (a row gather, not C strided reads).
        table = torch.cat([f.permute(0, 2, 3, 1).flatten(1, 2) for f in features], dim=1)
        return PackedFeatures(table.flatten(0, 1), tuple(levels), batch)

    def forward(
        self, features: Union[List[torch.Tensor], PackedFeatures], boxes: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            features: L maps (B, C, H_l, W_l) (finest first) or their ``pack``.
            boxes: (B, N, 4) abs xyxy in input-image pixels.
        Returns:
            (B·N, C, R_h, R_w) image-major, in ``torch.channels_last`` memory format (the natural
            layout of a row gather; consumers that flatten the bins to (M, P, C) need no copy).
        """
        packed = features if isinstance(features, PackedFeatures) else self.pack(features)
        table, levels = packed.table, packed.levels
        if boxes.dim() != 3 or boxes.shape[0] != packed.batch or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be ({packed.batch}, N, 4), got {tuple(boxes.shape)}")
        batch, num = boxes.shape[:2]
        (r_h, r_w), ratio = self.output_size, self.sampling_ratio
        # Coordinates reach ~1e3 px: never interpolate them below float32.
        boxes = boxes.detach().to(torch.promote_types(boxes.dtype, torch.float32))
        finite = torch.isfinite(boxes).all(dim=-1)
        if len(levels) == 1:  # ROIPooler skips the level rule (and its NaN) for one level
            level, keep = torch.zeros_like(boxes[..., 0]), finite
        else:
            level = assign_levels(boxes, self.min_level, self.max_level,
                                  self.canonical_box_size, self.canonical_level)
            keep = finite & ~torch.isnan(level)
            level = torch.where(keep, level, 0.0)
        # Dropped boxes become a harmless (0,0,0,0) box so no NaN/inf reaches an index.
        boxes = torch.where(keep[..., None], boxes, 0.0)
        scale = _per_level(level, self.scales)
        height = _per_level(level, [float(h) for _, h, _ in levels])
        width = _per_level(level, [float(w) for _, _, w in levels])
        y_index, y_weight = _axis_taps(
            boxes[..., 1] * scale, boxes[..., 3] * scale, height, r_h, ratio, self.aligned
        )
        x_index, x_weight = _axis_taps(
            boxes[..., 0] * scale, boxes[..., 2] * scale, width, r_w, ratio, self.aligned
        )
        # Row of the table of each (y) tap: image offset + level base + y·W_l.
        per_image = sum(h * w for _, h, w in levels)  # S
        image = torch.arange(batch, device=boxes.device)[:, None] * per_image
        row = image + _per_level(level, [float(b) for b, _, _ in levels]).long()
        row = row[..., None, None, None] + y_index * width.long()[..., None, None, None]
        # (B, N, R_h, R_w, s_y, s_x, 2_y, 2_x) → (M·R_h·R_w, T); ÷ s² = roi_align's mean.
        y_shape = (batch, num, r_h, 1, ratio, 1, 2, 1)
        x_shape = (batch, num, 1, r_w, 1, ratio, 1, 2)
        index = row.view(y_shape) + x_index.view(x_shape)
        weight = y_weight.view(y_shape) * x_weight.view(x_shape)
        weight = weight * (keep.to(weight.dtype) / ratio**2).view(batch, num, *[1] * 6)
        index = index.reshape(batch * num * r_h * r_w, 4 * ratio**2)
        weight = weight.reshape(batch * num * r_h * r_w, 4 * ratio**2).to(table.dtype)
        out = weighted_gather(table, index, weight)
        return out.view(batch * num, r_h, r_w, table.shape[1]).permute(0, 3, 1, 2)
