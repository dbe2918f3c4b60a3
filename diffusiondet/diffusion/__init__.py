"""Pure-torch diffusion math shared by DiffusionDet and DiffusionInst (no detectron2, no cfg)."""
from .box_signal import (
    boxes_to_signal,
    cxcywh_to_xyxy,
    normalized_cxcywh_to_signal,
    signal_to_boxes,
    signal_to_normalized_cxcywh,
    xyxy_to_cxcywh,
)
from .corruption import PADDING_STRATEGIES, CorruptedBoxes, corrupt_boxes, pad_boxes
from .ddim import ddim_coefficients, ddim_step, ddim_time_pairs, predict_noise_from_start
from .random_source import RandomSource, ReplayRandom, TorchRandom, seeded_source
from .renewal import compact_kept_first, masked_renew_and_step, renew_and_step
from .schedule import (
    DIFFUSION_BUFFER_NAMES,
    cosine_beta_schedule,
    diffusion_buffers,
    extract_per_sample,
    q_sample,
)

__all__ = [
    "DIFFUSION_BUFFER_NAMES",
    "PADDING_STRATEGIES",
    "CorruptedBoxes",
    "RandomSource",
    "ReplayRandom",
    "TorchRandom",
    "boxes_to_signal",
    "compact_kept_first",
    "corrupt_boxes",
    "cosine_beta_schedule",
    "cxcywh_to_xyxy",
    "ddim_coefficients",
    "ddim_step",
    "ddim_time_pairs",
    "diffusion_buffers",
    "extract_per_sample",
    "normalized_cxcywh_to_signal",
    "pad_boxes",
    "seeded_source",
    "predict_noise_from_start",
    "q_sample",
    "masked_renew_and_step",
    "renew_and_step",
    "signal_to_boxes",
    "signal_to_normalized_cxcywh",
    "xyxy_to_cxcywh",
]
