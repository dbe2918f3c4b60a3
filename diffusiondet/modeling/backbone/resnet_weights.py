"""torchvision ImageNet ResNet weights -> the detectron2 ResNet layout the official configs load.

The official ResNet-101 configs (``configs/diffdet.*.res101.yaml``) set
``MODEL.WEIGHTS: models/torchvision-R-101.pkl`` with ``RESNETS.STRIDE_IN_1X1: False``: a torchvision
ResNet renamed to detectron2's module names and pickled as ``{"model": {name: ndarray},
"__author__": "torchvision", "matching_heuristics": True}``.  detectron2's ``DetectionCheckpointer``
reads that pickle and, because of ``matching_heuristics``, matches every name by suffix onto
``backbone.bottom_up.*``.  ``tools/convert_torchvision_resnet_to_d2.py`` is the command-line entry.

Renaming (any depth; BasicBlocks of ResNet-18/34 simply have no ``conv3``/``bn3``)::

    conv1.weight                       -> stem.conv1.weight
    bn1.{weight,bias,running_*}        -> stem.conv1.norm.*
    layer{i}.{j}.conv{k}.weight        -> res{i+1}.{j}.conv{k}.weight
    layer{i}.{j}.bn{k}.*               -> res{i+1}.{j}.conv{k}.norm.*
    layer{i}.{j}.downsample.0.weight   -> res{i+1}.{j}.shortcut.weight
    layer{i}.{j}.downsample.1.*        -> res{i+1}.{j}.shortcut.norm.*
    fc.*, *.num_batches_tracked        -> dropped (no classifier; FrozenBN keeps no counter)

Values are copied unchanged: torchvision and detectron2 both store convolutions as (out, in, kh, kw)
and both expect RGB input normalised with the ImageNet mean/std, which is what the official
Base-DiffusionDet.yaml's PIXEL_MEAN/PIXEL_STD and ``FORMAT: RGB`` supply.  Only the place of the
stride differs: torchvision's Bottleneck strides in the 3x3 conv, hence ``STRIDE_IN_1X1: False``.
"""
import re

from . import d2_pickle

_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
_BN = r"(weight|bias|running_mean|running_var)"
_DROPPED = re.compile(r"fc\.(weight|bias)|(.+\.)?num_batches_tracked")


def _block(m):
    """``res{i+1}.{j}`` of a match whose groups 1, 2 are torchvision's layer i and block j."""
    return f"res{int(m[1]) + 1}.{m[2]}"


# (torchvision pattern, detectron2 name of a match): one per torchvision name family; anything
# else is unknown and rejected rather than silently dropped, so a checkpoint of another
# architecture cannot pass for a ResNet.
_RULES = (
    (re.compile(r"conv1\.weight"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"bn1\.{_BN}"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"layer([1-4])\.(\d+)\.conv([1-3])\.weight"), lambda m: f"{_block(m)}.conv{m[3]}.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.bn([1-3])\.{_BN}"), lambda m: f"{_block(m)}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"layer([1-4])\.(\d+)\.downsample\.0\.weight"), lambda m: f"{_block(m)}.shortcut.weight"),
    (re.compile(rf"layer([1-4])\.(\d+)\.downsample\.1\.{_BN}"), lambda m: f"{_block(m)}.shortcut.norm.{m[3]}"),
)


def _d2_name(key):
    """The detectron2 name of torchvision ``key``; ``None`` if dropped; ValueError if unknown."""
    if _DROPPED.fullmatch(key):
        return None
    for pattern, rename in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return rename(m)
    raise ValueError(key)


def torchvision_resnet_to_d2(state_dict):
    """Rename a torchvision ResNet ``state_dict`` (any depth) to detectron2's ResNet names.

    Returns a new ``{d2_name: value}`` dict holding the very same tensors (or arrays); ``fc.*`` and
    ``num_batches_tracked`` are dropped.  Raises ``ValueError`` for a dict that is not a torchvision
    ResNet: no 4-D 3-channel ``conv1.weight``, names it does not know (another architecture, a
    ``module.`` prefix, extra layers), or a convolution without all four of its BatchNorm tensors.
    """
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise ValueError(f"expected a state dict (a dict of tensors), got {kind}")
    stem = state_dict.get("conv1.weight")
    if stem is None or len(stem.shape) != 4 or stem.shape[1] != 3:
        found = ", ".join(list(state_dict)[:5]) or "nothing"
        raise ValueError(
            "not a torchvision ResNet state dict: expected a 4-D 'conv1.weight' over 3 input "
            f"channels; the first keys are: {found}"
        )
    out, unknown = {}, []
    for key, value in state_dict.items():
        try:
            name = _d2_name(key)
        except ValueError:
            unknown.append(key)
            continue
        if name is not None:
            out[name] = value
    if unknown:
        more = f" ... ({len(unknown)} in all)" if len(unknown) > 8 else ""
        shown = ", ".join(unknown[:8]) + more
        raise ValueError(f"not a torchvision ResNet state dict: unknown keys {shown}")
    # Every convolution is followed by a BatchNorm in a ResNet; a missing one would load as
    # FrozenBN's identity default and give silently wrong features.
    missing = [
        f"{conv[: -len('.weight')]}.norm.{field}"
        for conv in out
        if conv.endswith(".weight") and ".norm." not in conv
        for field in _BN_FIELDS
        if f"{conv[: -len('.weight')]}.norm.{field}" not in out
    ]
    if missing:
        raise ValueError(f"incomplete ResNet state dict: missing BatchNorm tensors {missing[:8]}")
    return out


def save_d2_pickle(model_dict, path, author="torchvision"):
    """Write ``model_dict`` as the detectron2 model-zoo pickle (see ``d2_pickle``); returns the
    number of arrays. ``matching_heuristics`` makes the checkpointer match these names by suffix
    (they lack the ``backbone.bottom_up.`` prefix)."""
    return d2_pickle.save_d2_pickle(model_dict, path, author)
