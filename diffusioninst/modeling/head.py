"""DiffusionInst's head: DiffusionDet's DynamicHead plus per-stage mask filters and a mask branch.

Shape legend: S stages, B images, N proposals, D hidden width, P mask-filter length
(``DynamicMaskHeadSpec.num_params``, 153 officially), C mask-feature channels (8), H/s × W/s the
mask feature map at the mask stride s (4 officially) of the padded batch.
State-dict keys are the official ones: ``head_series.{i}.controller.*`` and
``mask_refine.{l}.{0,1}.*`` / ``mask_head.{j}.{0,1}.*`` / ``mask_head.{J}.*``.
"""
from typing import Dict, List, Sequence

import torch
from torch import nn

from diffusiondet.modeling.head import DynamicHead, RefinementStage, xavier_init_matrices

from .dynamic_mask_head import DynamicMaskHeadSpec
from .mask_branch import build_mask_refine, build_mask_tower, mask_branch_forward

__all__ = ["MaskFilterStage", "DiffusionInstHead"]


class MaskFilterStage(RefinementStage):
    """A refinement stage that also predicts each proposal's dynamic mask filter.

    ``controller`` (the official name) is a Linear on the regression tower's output, the same
    feature that predicts the box deltas, as in the official implementation.
    """

    def __init__(self, *, num_mask_params: int, **kwargs):
        """
        Args:
            num_mask_params: P, length of the filter vector of one proposal.
            **kwargs: :class:`RefinementStage` arguments.
        """
        super().__init__(**kwargs)
        self.controller = nn.Linear(self.bboxes_delta.in_features, num_mask_params)

    def extra_outputs(self, *, obj_features, cls_feature, reg_feature) -> Dict[str, torch.Tensor]:
        """``pred_kernels``: (B, N, P) mask filters from the regression feature (B, N, D)."""
        return {"pred_kernels": self.controller(reg_feature)}


class DiffusionInstHead(DynamicHead):
    """:class:`DynamicHead` whose stages also output ``pred_kernels`` (S, B, N, P), with a mask
    branch giving the per-image ``mask_feat`` (B, C, H/s, W/s)."""

    def __init__(
        self,
        *,
        mask_in_indices: Sequence[int],
        mask_strides: Sequence[int],
        mask_branch_channels: int = 128,
        mask_num_convs: int = 4,
        mask_head_spec: DynamicMaskHeadSpec = DynamicMaskHeadSpec(),
        mask_norm: str = "BN",
        **kwargs,
    ):
        """
        Args:
            mask_in_indices: positions, in the head's feature list, of the levels that build
                the mask feature, finest first (official: 0, 1, 2 = p2, p3, p4).
            mask_strides: stride of each of those levels; the first is the mask stride.
            mask_branch_channels: width of the refine convs and of the tower (official 128).
            mask_num_convs: 3×3 convs of the tower (official 4).
            mask_head_spec: layout of the dynamic mask head; its ``in_channels`` is the mask
                feature width C and its ``num_params`` the filter length P.
            mask_norm: detectron2 norm name of the mask branch ("BN" officially).
            **kwargs: :class:`DynamicHead` arguments (``stage_class`` is set here).
        """
        if len(mask_in_indices) != len(mask_strides) or not mask_in_indices:
            raise ValueError(
                f"mask_in_indices {list(mask_in_indices)} and mask_strides "
                f"{list(mask_strides)} must be non-empty and of equal length"
            )
        stage_kwargs = {**kwargs.pop("stage_kwargs", {}), "num_mask_params": mask_head_spec.num_params}
        super().__init__(stage_class=MaskFilterStage, stage_kwargs=stage_kwargs, **kwargs)
        self.mask_in_indices = list(mask_in_indices)
        self.mask_strides = list(mask_strides)
        self.mask_stride = int(mask_strides[0])
        self.mask_head_spec = mask_head_spec
        self.mask_refine = build_mask_refine(
            self.hidden_dim, mask_branch_channels, len(mask_in_indices), mask_norm
        )
        self.mask_head = build_mask_tower(
            mask_branch_channels, mask_num_convs, mask_head_spec.in_channels, mask_norm
        )
        # The official head initialises every matrix of the head (mask branch included) with
        # Xavier; the stages were initialised by DynamicHead.
        xavier_init_matrices(self.mask_refine)
        xavier_init_matrices(self.mask_head)

    def per_image_outputs(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``mask_feat``: (B, C, H/s, W/s) from the levels ``mask_in_indices`` of ``features``.

        It depends on the image only: computed once per training step and once per image at
        inference, not at every sampling step.
        """
        levels = [features[i] for i in self.mask_in_indices]
        return {
            "mask_feat": mask_branch_forward(
                self.mask_refine, self.mask_head, levels, self.mask_strides
            )
        }
