"""Allowed values of string-valued options, shared by config validation and the modules.

Kept apart from ``modeling`` so that ``config.py`` (which only reads and checks a cfg) does not
import the model code.
"""
import torch

# INFERENCE_AMP value -> autocast dtype ("" = full precision).
INFERENCE_AMP_DTYPES = {"": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# Which model calls of a multi-step DDIM run feed the ensemble (see DDIMBoxSampler).
ENSEMBLE_MODES = ("official", "all_steps")

# How the sampler moves kept boxes between steps: "ddim" (official DDIM update) or "x0" (the
# predicted boxes themselves, paper Table 4c "without DDIM").
SAMPLER_UPDATES = ("ddim", "x0")

# How inference samples: "parity" replays the official draw order (renewal compacts the kept
# boxes, data-dependent shapes); "graph" renews by masking with N fixed and batches the final
# NMS, so a step has no host syncs and compiles as one graph (see GraphBoxSampler).
SAMPLING_MODES = ("parity", "graph")
