"""Accelerations: how the model runs faster on a given machine, never what it computes.

Everything here leaves the detections unchanged up to float rounding (most of it bit for bit),
and leaves parameters and state-dict keys alone, so official checkpoints load as they are. The
model reaches this package through the names below only (an import contract in setup.cfg):

* :class:`SpeedOptions` (from the config's DYNAMIC_CHUNK_SIZE, DYNAMIC_MEMORY_BUDGET_MB,
  POOLER_THREADS, FIXED_SHAPE_POOLING, FOLD_FROZEN_BN, COMPILE_HEAD) and :func:`accelerate`,
  which applies them to a newly built model (:func:`accelerate_head` to a head built alone);
  :func:`set_head_speed_options` changes a head's;
* :class:`AcceleratedRoIPooling`, the head's RoI pooling (threaded or fixed-shape, see
  :mod:`.roi_pooling`), and :func:`pooling_for_sampling`, the pooling of a sampling loop;
* :func:`proposals_per_chunk`, how many proposals DynamicConv handles at once
  (:mod:`.chunk_budget`).

Inside: :mod:`.threaded_pooler`, :mod:`.fixed_shape_pooler`, :mod:`.frozen_bn_folding`,
:mod:`.chunk_budget`. Nothing here imports the rest of ``diffusiondet.modeling``.
"""
from .chunk_budget import DEFAULT_MEMORY_BUDGET_BYTES, proposals_per_chunk
from .roi_pooling import AcceleratedRoIPooling, pooling_for_sampling, pools_with_fixed_shapes
from .speed_options import SpeedOptions, accelerate, accelerate_head, set_head_speed_options

__all__ = [
    "AcceleratedRoIPooling",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "SpeedOptions",
    "accelerate",
    "accelerate_head",
    "pooling_for_sampling",
    "pools_with_fixed_shapes",
    "proposals_per_chunk",
    "set_head_speed_options",
]
