"""DynamicHead: S refinement stages that turn noisy boxes into class logits and refined boxes.

Shape legend: B images, N proposals per image, S stages returned (num_stages with deep
supervision, else 1), K class logits (num_classes with sigmoid/focal, num_classes + 1 otherwise),
D = hidden_dim, L feature levels (p2..p5 by default).
Boxes are abs xyxy (absolute pixel x1y1x2y2 in the un-padded input image frame).
"""
import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

import torch
from torch import nn

from ..acceleration import AcceleratedRoIPooling
from .refinement_stage import ACTIVATIONS, RefinementStage
from .time_embedding import build_time_mlp

__all__ = ["DynamicHead", "xavier_init_matrices"]


class DynamicHead(AcceleratedRoIPooling, nn.Module):
    """Sparse R-CNN-style iterative head conditioned on the diffusion timestep (the "detection
    decoder" of the DiffusionDet paper, arXiv 2211.09788, Sec. 3.2).

    State-dict keys are the official ones: ``head_series.{i}.*`` and ``time_mlp.{1,3}.*``; the
    pooler and box decoder are stateless. RoI pooling has detectron2's ``ROIPooler`` semantics;
    how it runs, and the head's other speed options, are the accelerations'
    (:class:`~diffusiondet.modeling.acceleration.AcceleratedRoIPooling`,
    :func:`~diffusiondet.modeling.acceleration.set_head_speed_options`).

    Extension points (DiffusionInst): ``stage_class`` / ``stage_kwargs`` build the stages from a
    :class:`RefinementStage` subclass whose extra per-proposal outputs are stacked stage-major,
    and :meth:`per_image_outputs` adds outputs computed once per image (e.g. a mask feature map).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        pooler_resolution: int = 7,
        pooler_scales: Sequence[float],
        sampling_ratio: int = 2,
        pooler_type: str = "ROIAlignV2",
        hidden_dim: int = 256,
        dim_feedforward: int = 2048,
        nhead: int = 8,
        dropout: float = 0.0,
        activation: str = "relu",
        num_stages: int = 6,
        num_cls: int = 1,
        num_reg: int = 3,
        dim_dynamic: int = 64,
        num_dynamic: int = 2,
        use_focal: bool = True,
        prior_prob: float = 0.01,
        deep_supervision: bool = True,
        bbox_weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: float = math.log(100000.0 / 16),
        stage_class: Type[RefinementStage] = RefinementStage,
        stage_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        """
        Args:
            num_classes: number of foreground classes.
            in_channels: channels of every pooled feature level; must equal ``hidden_dim``.
            pooler_resolution / pooler_scales / sampling_ratio / pooler_type: detectron2
                :class:`ROIPooler` settings; scales are 1/stride of each level, finest first.
            hidden_dim: D, width of object features; the time MLP is 4·D wide.
            dim_feedforward / nhead / dropout / activation: per-stage transformer settings.
            num_stages: number of refinement stages.
            num_cls / num_reg: depths of the classification / regression towers.
            dim_dynamic / num_dynamic: DynamicConv sizes (num_dynamic must be 2).
            use_focal: sigmoid (focal or federated) classification with K = num_classes logits;
                False gives K = num_classes + 1 (softmax with background).
            prior_prob: initial foreground probability encoded in ``class_logits.bias``
                (sigmoid case only).
            deep_supervision: return every stage's outputs (S = num_stages) instead of the
                last one only (S = 1).
            bbox_weights: (wx, wy, ww, wh) of detectron2's ``Box2BoxTransform``.
            scale_clamp: max dw/dh before exp (default ln(100000/16)).
            stage_class: the refinement stage, :class:`RefinementStage` or a subclass.
            stage_kwargs: extra keyword arguments of ``stage_class`` (beyond the ones above).
        """
        super().__init__()
        if in_channels != hidden_dim:
            raise ValueError(
                f"in_channels ({in_channels}) must equal hidden_dim ({hidden_dim}): RoI features "
                "are used directly as object features"
            )
        if num_dynamic != 2:
            raise ValueError(f"num_dynamic must be 2 (the only official layout), got {num_dynamic}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.num_classes = num_classes
        self.num_logits = num_classes if use_focal else num_classes + 1
        self.hidden_dim = hidden_dim
        self.deep_supervision = deep_supervision
        self.init_roi_pooling(
            output_size=pooler_resolution,
            scales=pooler_scales,
            sampling_ratio=sampling_ratio,
            pooler_type=pooler_type,
        )
        self.time_mlp = build_time_mlp(hidden_dim)
        stage = stage_class(
            num_logits=self.num_logits,
            hidden_dim=hidden_dim,
            pooler_resolution=pooler_resolution,
            dim_feedforward=dim_feedforward,
            nhead=nhead,
            dropout=dropout,
            activation=activation,
            num_cls=num_cls,
            num_reg=num_reg,
            dim_dynamic=dim_dynamic,
            num_dynamic=num_dynamic,
            bbox_weights=bbox_weights,
            scale_clamp=scale_clamp,
            **dict(stage_kwargs or {}),
        )
        xavier_init_matrices(self.time_mlp)
        xavier_init_matrices(stage)
        if use_focal:
            # Only the classifier bias: the official rule "any tensor whose last dim is K" also
            # hits bboxes_delta.bias (K=4) or inst_interact.norm1 (K=64).
            nn.init.constant_(stage.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        # Copies of one initialised stage: every stage starts identical, as in the official
        # implementation.
        self.head_series = nn.ModuleList(copy.deepcopy(stage) for _ in range(num_stages))

    def forward(
        self,
        features: List[torch.Tensor],
        init_boxes: torch.Tensor,
        t: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            features: L feature maps (p2..p5), each (B, D, H_l, W_l), or their
                :meth:`prepare_features` (fixed-shape pooling only).
            init_boxes: (B, N, 4) abs xyxy noisy boxes, any float dtype (cast to the features'
                dtype, but never below float32: coordinates reach ~1e3 and beyond).
            t: (B,) diffusion timesteps (integers in [0, T)), or (1,): one timestep shared by
                all images (the graph-friendly sampler; no ``torch.unique``, no host sync).

        Returns:
            dict with stage-major per-proposal tensors (S, B, N, ...):
              "pred_logits": (S, B, N, K) class logits;
              "pred_boxes": (S, B, N, 4) abs xyxy refined boxes;
              "obj_features": (S, B, N, D) per-stage object features before time modulation;
              plus the stages' ``extra_outputs``.
            Outputs that depend on the image only come from :meth:`per_image_outputs`, a
            separate call: they do not change between sampling steps.
        """
        pool, feature_dtype = self.roi_pooling(features)  # boxes (B, N, 4) -> (B·N, D, R, R)
        boxes = init_boxes.to(torch.promote_types(feature_dtype, torch.float32))
        # One embedding per distinct timestep. At inference all images share t, and a GEMM over
        # B equal rows rounds differently from one over 1 row: this keeps a batch's outputs
        # bit-identical to each image's alone.
        if t.shape[0] == 1:
            time_emb, time_index = self.time_mlp(t), None  # (1, 4D), broadcast over images
        else:
            unique_t, time_index = torch.unique(t, return_inverse=True)  # (U,), (B,)
            time_emb = self.time_mlp(unique_t)  # (U, 4D), shared by all stages
        pro_features = None
        per_stage: List[Dict[str, torch.Tensor]] = []
        for stage in self.head_series:
            roi_features = pool(boxes)  # (B·N, D, R, R)
            stage_out = stage(roi_features, boxes, pro_features, time_emb, time_index)
            pro_features = stage_out["obj_features"]
            if self.deep_supervision:
                per_stage.append(stage_out)
            # Each stage learns to refine a fixed input; gradients do not chain through boxes.
            boxes = stage_out["pred_boxes"].detach()
        if not self.deep_supervision:
            per_stage = [stage_out]
        return {key: torch.stack([out[key] for out in per_stage]) for key in per_stage[0]}

    def per_image_outputs(self, features: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Hook for subclasses: outputs that depend on the image only (none here), computed
        once per training step and once per image at inference (not once per sampling step).

        Args:
            features: the L feature maps given to :meth:`forward`, each (B, D, H_l, W_l).

        Returns:
            name -> (B, ...) tensors.
        """
        return {}


def xavier_init_matrices(module: nn.Module) -> None:
    """Xavier-uniform initialisation of every parameter with 2+ dims (the official head init)."""
    # Matrices (and any ≥2-D tensor) only; biases keep PyTorch defaults, LayerNorms stay 1/0.
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)
