"""Swin Transformer + FPN backbone under the names the official DiffusionDet implementation uses.

The Swin itself is detectron2's ``detectron2.modeling.backbone.swin.SwinTransformer``; this file
only renames its outputs ``p{i}`` to the official ``swin{i}`` and wraps it in detectron2's FPN,
so that the official config keys and checkpoint layout apply unchanged:

* config: ``MODEL.BACKBONE.NAME: "build_swintransformer_fpn_backbone"``, ``MODEL.SWIN.SIZE``
  (architecture from :data:`diffusiondet.backbone_config.SWIN_SIZES`), ``MODEL.SWIN.USE_CHECKPOINT``,
  ``MODEL.SWIN.OUT_FEATURES``, ``MODEL.FPN.IN_FEATURES: ["swin0", "swin1", "swin2", "swin3"]``;
* state dict: ``backbone.bottom_up.{patch_embed, layers.{s}.blocks.{b}, layers.{s}.downsample,
  norm{i}}.*`` and ``backbone.fpn_{lateral,output}{2..5}.*`` (no extra module level).

Output ``swin{i}`` of an image batch (B, 3, H, W), H and W multiples of 32:
(B, embed_dim * 2**i, H / 2**(i+2), W / 2**(i+2)), after its own LayerNorm ``norm{i}``.

ImageNet weights: the original Swin release's ``.pth`` (``{"model": state_dict}``) becomes a
detectron2 ``.pkl`` through :func:`convert_swin_classification_checkpoint` (CLI:
``tools/convert_swin_to_d2.py``); detectron2's ``DetectionCheckpointer`` then loads it with its
suffix-matching heuristics (``layers.0...`` matches ``backbone.bottom_up.layers.0...``).
"""
from typing import Dict

import torch

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN
from detectron2.modeling.backbone.swin import SwinTransformer

from ...backbone_config import SWIN_SIZES
from .d2_pickle import d2_pickle_content
from .fpn import fpn_over

__all__ = [
    "D2SwinTransformer",
    "build_swin_backbone",
    "build_swintransformer_fpn_backbone",
    "convert_swin_classification_checkpoint",
]


def _swin_name(i: int) -> str:
    return f"swin{i}"


class D2SwinTransformer(SwinTransformer):
    """detectron2's SwinTransformer with outputs named ``swin{i}`` instead of ``p{i}``.

    No module is added or wrapped, so parameter names stay those of the parent (and of the
    official checkpoints); ``forward`` is the parent's, only the dict keys change.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The parent filled its bookkeeping with "p{i}"; FPN reads it through output_shape().
        self._out_features = [_swin_name(i) for i in self.out_indices]
        self._out_feature_channels = {_swin_name(i): self.num_features[i] for i in self.out_indices}
        self._out_feature_strides = {_swin_name(i): 2 ** (i + 2) for i in self.out_indices}
        # The parent's size_divisibility property reads _size_divisibility but its __init__
        # sets a misspelt _size_devisibility (detectron2 0.6-0.7), so the property raises.
        self._size_divisibility = 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: (B, C_in, H, W) -> {"swin{i}": (B, embed_dim * 2**i, ceil(H / 2**(i+2)), ...)}."""
        outs = super().forward(x)
        return {_swin_name(int(name[1:])): feat for name, feat in outs.items()}


def build_swin_backbone(cfg, input_shape: ShapeSpec) -> D2SwinTransformer:
    """The bare Swin of ``MODEL.SWIN.SIZE`` exporting stages ``MODEL.SWIN.OUT_FEATURES``.

    Frozen stages are always -1 (nothing frozen), as in the official model:
    ``MODEL.BACKBONE.FREEZE_AT`` (a ResNet setting, default 2) is deliberately ignored here.
    """
    arch = SWIN_SIZES[cfg.MODEL.SWIN.SIZE]
    return D2SwinTransformer(
        patch_size=4,
        in_chans=input_shape.channels,
        embed_dim=arch["embed_dim"],
        depths=tuple(arch["depths"]),
        num_heads=tuple(arch["num_heads"]),
        window_size=arch["window_size"],
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=arch["drop_path_rate"],
        ape=False,
        patch_norm=True,
        out_indices=tuple(cfg.MODEL.SWIN.OUT_FEATURES),
        frozen_stages=-1,
        use_checkpoint=cfg.MODEL.SWIN.USE_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_swintransformer_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """Swin + detectron2 FPN (+ max-pooled p6), as detectron2's ``build_resnet_fpn_backbone``.

    Outputs p2..p6 (strides 4..64, ``MODEL.FPN.OUT_CHANNELS`` channels); ``size_divisibility``
    is 32 (the coarsest Swin stride), so the meta-architecture pads images to multiples of 32.
    """
    bottom_up = build_swin_backbone(cfg, input_shape)
    return fpn_over(bottom_up, cfg)


# Keys of the Swin classification release that detection never uses: the classifier (head.*),
# its final LayerNorm (norm.*; detection has its own norm0..3) and the shift masks (attn_mask,
# recomputed for every input size). Dropping norm.* also keeps detectron2's suffix matching from
# ever considering it for another "*.norm.weight".
_CLASSIFICATION_ONLY = ("head.", "norm.")


def convert_swin_classification_checkpoint(checkpoint: dict, author: str = "Swin Transformer") -> dict:
    """Original Swin ``.pth`` content -> detectron2 model-zoo-style ``.pkl`` content.

    ``checkpoint``: ``{"model": {name: tensor}}`` (the release's layout; a bare state dict is
    accepted too). Returns ``{"model": {name: numpy array}, "__author__": author,
    "matching_heuristics": True}`` with the classification-only keys removed; names keep no
    ``backbone.bottom_up.`` prefix, which detectron2's matching heuristics add back on load.
    """
    state = checkpoint.get("model", checkpoint)
    kept = {
        name: value
        for name, value in state.items()
        if not (name.startswith(_CLASSIFICATION_ONLY) or name.endswith("attn_mask"))
    }
    return d2_pickle_content(kept, author)
