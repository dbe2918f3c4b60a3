"""Dynamic mask head φ: per-instance 1×1 conv layers whose weights come from a flat vector.

Shape legend: B images, C mask-feature channels, H×W the mask-feature map (stride 4 of the padded
image), M instances, P parameters per instance (153 for the default 8→8→8→1 head).

Parameter layout (the official implementation's): a P-vector holds all layer weights first, then
all biases, in layer order. Each weight block is out-major (element ``o·in + i`` is output ``o``,
input ``i``), i.e. the layout of a ``Conv2d(in, out, 1)`` weight flattened. The official implementation
appends no relative coordinates to the input (the first layer reads C channels), so a filter sees
only the features' content and cannot tell two alike objects apart by where they are. With
``rel_coords`` the two channels CondInst appends come first (C + 2 inputs): each pixel's offset
from the instance's box centre in units of the box's width and height (docs/diffusioninst_recipe.md).
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DynamicMaskHeadSpec:
    """Layer widths of the dynamic mask head.

    Attributes:
        in_channels: channels of the mask feature the head reads (8 in DiffusionInst).
        channels: output channels of each 1×1 conv layer in order; the last must be 1 (one logit
            map per instance). Default (8, 8, 1) gives the official 153-parameter head.
        rel_coords: the first layer also reads the 2 box-relative coordinates (169 parameters
            with the default widths); False is the official head.
    """

    in_channels: int = 8
    channels: Tuple[int, ...] = (8, 8, 1)
    rel_coords: bool = False

    def __post_init__(self):
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")
        # Normalise lists to a tuple so the frozen spec stays hashable and comparable.
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.channels) == 0:
            raise ValueError("channels must name at least one layer")
        if any(not isinstance(c, int) or c < 1 for c in self.channels):
            raise ValueError(f"every entry of channels must be a positive int, got {self.channels}")
        if self.channels[-1] != 1:
            raise ValueError(
                f"the last layer must output 1 channel (one mask logit map), got {self.channels}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.channels)

    @property
    def layer_in_channels(self) -> List[int]:
        """Input width of each layer: in_channels (+ 2 relative coordinates) for the first, the
        previous output after."""
        first = self.in_channels + (2 if self.rel_coords else 0)
        return [first, *self.channels[:-1]]

    @property
    def weight_nums(self) -> List[int]:
        """Number of weight entries per layer, in order (e.g. [64, 64, 8])."""
        return [cin * cout for cin, cout in zip(self.layer_in_channels, self.channels)]

    @property
    def bias_nums(self) -> List[int]:
        """Number of bias entries per layer, in order (e.g. [8, 8, 1])."""
        return list(self.channels)

    @property
    def num_params(self) -> int:
        """Length P of one instance's parameter vector (153 for the default)."""
        return sum(self.weight_nums) + sum(self.bias_nums)


def split_mask_params(
    params: torch.Tensor, spec: DynamicMaskHeadSpec
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Cut flat per-instance parameter vectors into layer weights and biases.

    Args:
        params: (M, P) parameter vectors, P == spec.num_params.
        spec: layer widths.

    Returns:
        weights: list of spec.num_layers tensors, layer l of shape (M, out_l, in_l).
        biases: list of spec.num_layers tensors, layer l of shape (M, out_l).
    """
    if params.dim() != 2:
        raise ValueError(f"params must be (M, P), got shape {tuple(params.shape)}")
    if params.shape[1] != spec.num_params:
        raise ValueError(
            f"params have {params.shape[1]} entries per instance but the spec {spec} needs "
            f"{spec.num_params}"
        )
    num_inst = params.shape[0]
    pieces = torch.split(params, spec.weight_nums + spec.bias_nums, dim=1)
    n = spec.num_layers
    weights = [
        w.reshape(num_inst, cout, cin)
        for w, cin, cout in zip(pieces[:n], spec.layer_in_channels, spec.channels)
    ]
    biases = [b.reshape(num_inst, cout) for b, cout in zip(pieces[n:], spec.channels)]
    return weights, biases


def relative_coordinates(
    boxes: torch.Tensor, height: int, width: int, stride: int
) -> torch.Tensor:
    """Each mask-feature pixel's offset from each box's centre, in box widths and heights.

    Pixel (i, j) of the stride-s map sits at input pixel (s//2 + s·j, s//2 + s·i), the grid of
    ``masks_at_stride``. Box sides are floored at s so that a degenerate box stays finite; the
    boxes are detached (the filters learn to use the position, the boxes are not moved by it).

    Args:
        boxes: (M, 4) abs xyxy in input pixels.
        height, width: the map's size h × w.
        stride: s.

    Returns:
        (M, 2, h·w) (x, y) offsets; about -0.5 .. 0.5 inside the box.
    """
    boxes = boxes.detach()
    ys = torch.arange(height, device=boxes.device, dtype=boxes.dtype) * stride + stride // 2
    xs = torch.arange(width, device=boxes.device, dtype=boxes.dtype) * stride + stride // 2
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    size = (boxes[:, 2:] - boxes[:, :2]).clamp(min=float(stride))  # (M, 2)
    rel_x = (grid_x.reshape(1, -1) - centre[:, :1]) / size[:, :1]
    rel_y = (grid_y.reshape(1, -1) - centre[:, 1:]) / size[:, 1:]
    return torch.stack([rel_x, rel_y], dim=1)


def dynamic_mask_logits(
    mask_feat: torch.Tensor,
    params: torch.Tensor,
    image_index: torch.Tensor,
    spec: DynamicMaskHeadSpec,
    boxes: Optional[torch.Tensor] = None,
    stride: Optional[int] = None,
) -> torch.Tensor:
    """Run every instance's own dynamic head on the mask feature of its image.

    All instances are evaluated together: each layer is one grouped 1×1 convolution with groups
    = M (computed as one batched matmul), so the cost is one call per layer whatever the number
    of instances or images.

    Args:
        mask_feat: (B, C, H, W) mask features, C == spec.in_channels.
        params: (M, P) parameter vectors, P == spec.num_params.
        image_index: (M,) long, the image (row of mask_feat) each instance belongs to.
        spec: layer widths.
        boxes: (M, 4) abs xyxy input-pixel boxes of the instances; needed (only) when
            ``spec.rel_coords``.
        stride: the mask stride s of ``mask_feat``; needed with ``boxes``.

    Returns:
        (M, H, W) mask logits (no sigmoid), over the whole padded map of each instance's image.
    """
    if mask_feat.dim() != 4:
        raise ValueError(f"mask_feat must be (B, C, H, W), got shape {tuple(mask_feat.shape)}")
    _, channels, height, width = mask_feat.shape
    if channels != spec.in_channels:
        raise ValueError(
            f"mask_feat has {channels} channels but the spec expects {spec.in_channels}"
        )
    weights, biases = split_mask_params(params, spec)
    num_inst = params.shape[0]
    if image_index.shape != (num_inst,):
        raise ValueError(
            f"image_index must have shape ({num_inst},), got {tuple(image_index.shape)}"
        )
    if num_inst == 0:
        return mask_feat.new_zeros((0, height, width))

    # A 1×1 conv with groups = M over (1, M·C, H, W) is, per group, a (C_out × C_in) matrix times
    # the (C_in × H·W) pixels: one batched matmul. Same result (tests compare with F.conv2d),
    # but the grouped-conv backward of oneDNN was measured 2.3x slower (M = 360, 40×40 map, 2
    # cores) and this is the hot spot of DiffusionInst training.
    # index_select, not mask_feat[image_index]: the backward of advanced indexing (index_put_
    # with accumulate) adds the M instances' gradients into the B maps in a thread-dependent
    # order on CPU, so two identical trainings drifted apart; index_select's backward
    # (index_add_) adds them in order (docs/reproducibility.md).
    x = torch.index_select(mask_feat, 0, image_index.long()).flatten(2)  # (M, C, H·W)
    if spec.rel_coords:
        if boxes is None or stride is None or boxes.shape != (num_inst, 4):
            raise ValueError(
                f"a head with relative coordinates needs (M, 4) = ({num_inst}, 4) boxes and the "
                f"mask stride, got boxes {None if boxes is None else tuple(boxes.shape)} and "
                f"stride {stride}"
            )
        rel = relative_coordinates(boxes.to(x.dtype), height, width, int(stride))
        x = torch.cat([rel, x], dim=1)  # (M, 2 + C, H·W)
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b[:, :, None], w, x)  # (M, C_out, H·W)
        if layer < spec.num_layers - 1:
            x = F.relu(x)
    return x.reshape(num_inst, height, width)
