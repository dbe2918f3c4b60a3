"""One refinement stage of the DynamicHead (the official ``RCNNHead``; one of the cascaded stages
of the DiffusionDet paper's decoder, arXiv 2211.09788, Sec. 3.2).

Shape legend: B images, N proposals per image, D = hidden_dim, E = 4·D (time-embedding width),
K class logits, R = pooler_resolution (P = R² RoI bins).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.modeling.box_regression import Box2BoxTransform
from torch import nn

from .dynamic_conv import DynamicConv

__all__ = ["RefinementStage", "ACTIVATIONS"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def _tower(hidden_dim: int, num_layers: int) -> nn.ModuleList:
    # Flat list [Linear, LayerNorm, ReLU] × num_layers: the ReLUs occupy indices so the official
    # checkpoint keys are 0/1, 3/4, 6/7. The Linear has no bias because LayerNorm follows it.
    layers = []
    for _ in range(num_layers):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=False), nn.LayerNorm(hidden_dim)]
        layers.append(nn.ReLU(inplace=True))
    return nn.ModuleList(layers)


class RefinementStage(nn.Module):
    """Self-attention → DynamicConv → FFN over proposals, then time-modulated cls/box towers.

    Module names equal the official ones (``self_attn``, ``inst_interact``, ``linear1/2``,
    ``norm1..3``, ``block_time_mlp.1``, ``cls_module``, ``reg_module``, ``class_logits``,
    ``bboxes_delta``) so official checkpoints load without renaming.

    Extension point: a subclass adds modules in ``__init__`` (under the official key, e.g.
    DiffusionInst's ``controller``) and returns extra per-proposal outputs from
    :meth:`extra_outputs`; :class:`DynamicHead` builds its stages from ``stage_class``.
    """

    def __init__(
        self,
        *,
        num_logits: int,
        hidden_dim: int,
        pooler_resolution: int,
        dim_feedforward: int = 2048,
        nhead: int = 8,
        dropout: float = 0.0,
        activation: str = "relu",
        num_cls: int = 1,
        num_reg: int = 3,
        dim_dynamic: int = 64,
        num_dynamic: int = 2,
        bbox_weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0),
        scale_clamp: float,
    ):
        """
        Args:
            num_logits: K, width of ``class_logits`` (num_classes with sigmoid/focal, +1 otherwise).
            hidden_dim: D, proposal-feature width (= FPN channels).
            pooler_resolution: R, side of the pooled RoI grid.
            dim_feedforward: FFN width. With "glu" the FFN output is halved before ``linear2``.
            nhead: attention heads (D must be divisible by it).
            dropout: dropout of attention and the three residual branches.
            activation: FFN activation, one of ``ACTIVATIONS``.
            num_cls / num_reg: depth of the classification / regression towers.
            dim_dynamic / num_dynamic: DynamicConv sizes (see :class:`DynamicConv`).
            bbox_weights: (wx, wy, ww, wh) delta weights for box decoding.
            scale_clamp: upper clamp of dw/dh before exp.
        """
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, dropout=dropout)
        self.inst_interact = DynamicConv(
            hidden_dim=hidden_dim,
            dim_dynamic=dim_dynamic,
            pooler_resolution=pooler_resolution,
            num_dynamic=num_dynamic,
        )
        self.activation = ACTIVATIONS[activation]
        ffn_out = dim_feedforward // 2 if activation == "glu" else dim_feedforward
        self.linear1 = nn.Linear(hidden_dim, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_out, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.block_time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim * 4, hidden_dim * 2))
        self.cls_module = _tower(hidden_dim, num_cls)
        self.reg_module = _tower(hidden_dim, num_reg)
        self.class_logits = nn.Linear(hidden_dim, num_logits)
        self.bboxes_delta = nn.Linear(hidden_dim, 4)
        # Stateless: detectron2's decoder is the box decoding of the official implementation
        # (weights, clamp, centre/size update) and keeps checkpoints unchanged.
        self.box2box_transform = Box2BoxTransform(
            weights=tuple(bbox_weights), scale_clamp=scale_clamp
        )

    def forward(
        self,
        roi_features: torch.Tensor,
        boxes: torch.Tensor,
        pro_features: Optional[torch.Tensor],
        time_emb: torch.Tensor,
        time_index: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            roi_features: (B·N, D, R, R) features pooled at ``boxes``, image-major.
            boxes: (B, N, 4) abs xyxy input boxes of this stage (the decoding reference).
            pro_features: (B, N, D) object features of the previous stage, or None for the first
                stage (then the mean of each RoI is used).
            time_emb: (B, E) output of the shared time MLP, or (U, E) for U distinct timesteps
                when ``time_index`` is given.
            time_index: optional (B,) long, the row of ``time_emb`` of each image.

        Returns:
            dict of per-proposal outputs, each (B, N, ...):
              "pred_logits": (B, N, K) class logits;
              "pred_boxes": (B, N, 4) abs xyxy refined boxes, float32 (detectron2 decodes in
                fp32 whatever the feature dtype);
              "obj_features": (B, N, D) object features before time modulation, the next
                stage's ``pro_features``;
              plus whatever :meth:`extra_outputs` returns.
        """
        num_images, num_boxes = boxes.shape[:2]
        roi = roi_features.flatten(2)  # (B·N, D, P)
        if pro_features is None:
            pro_features = roi.mean(-1).view(num_images, num_boxes, -1)  # (B, N, D)
        roi = roi.transpose(1, 2)  # (B·N, P, D)

        # Proposals of one image attend to each other; images never mix.
        seq = pro_features.transpose(0, 1)  # (N, B, D)
        attn = self.self_attn(seq, seq, seq, need_weights=False)[0]
        obj = self.norm1(seq + self.dropout1(attn)).transpose(0, 1)  # (B, N, D)

        obj = obj.flatten(0, 1)  # (B·N, D)
        obj = self.norm2(obj + self.dropout2(self.inst_interact(obj, roi)))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(obj))))
        obj = self.norm3(obj + self.dropout3(ffn))  # (B·N, D)
        obj_features = obj.view(num_images, num_boxes, -1)  # (B, N, D)

        # Timestep conditioning touches only the prediction towers, never the features that
        # flow to the next stage.
        scale_shift = self.block_time_mlp(time_emb)  # (B or U, 2D)
        if time_index is not None:
            scale_shift = scale_shift[time_index]  # (B, 2D)
        scale, shift = scale_shift[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        fc_feature = obj_features * (scale + 1) + shift  # (B, N, D)
        cls_feature = reg_feature = fc_feature
        for layer in self.cls_module:
            cls_feature = layer(cls_feature)
        for layer in self.reg_module:
            reg_feature = layer(reg_feature)
        logits = self.class_logits(cls_feature)  # (B, N, K)
        deltas = self.bboxes_delta(reg_feature)  # (B, N, 4)
        pred_boxes = self.box2box_transform.apply_deltas(deltas.flatten(0, 1), boxes.flatten(0, 1))
        outputs = {
            "pred_logits": logits,
            "pred_boxes": pred_boxes.view(num_images, num_boxes, 4),
            "obj_features": obj_features,
        }
        outputs.update(
            self.extra_outputs(
                obj_features=obj_features, cls_feature=cls_feature, reg_feature=reg_feature
            )
        )
        return outputs

    def extra_outputs(
        self,
        *,
        obj_features: torch.Tensor,
        cls_feature: torch.Tensor,
        reg_feature: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Hook for subclasses: extra per-proposal outputs of this stage (none here).

        Args:
            obj_features: (B, N, D) object features before time modulation.
            cls_feature: (B, N, D) output of the time-modulated classification tower.
            reg_feature: (B, N, D) output of the time-modulated regression tower (the input of
                ``bboxes_delta``).

        Returns:
            name -> (B, N, ...) tensors; the head stacks them stage-major like the logits.
        """
        return {}
