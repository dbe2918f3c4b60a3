"""Parameters and FLOPs of any config, DiffusionDet, DiffusionInst and DiffusionEngine alike:
what ``tools/analyze_model.py`` runs (docs/speed.md, "Parameters and FLOPs").

The counting is ``diffusiondet.tooling.model_analysis``'s (FlopCounterMode, FLOPs = 2 × MACs).
Here: the model is built from the config, and a frozen Stable Diffusion backbone is split into
its parts, each counted on ``meta`` tensors: the VAE encoder (the decoder never runs), the one
U-Net call, the trainable channel mapper, and the text encoder, which runs once when the model
is built (the prompt's embedding is kept), so 0 calls per image.

Shape legend: (Hp, Wp) the padded input, multiple of the VAE factor 8; (h, w) = (Hp / 8, Wp / 8)
the latent.
"""
from typing import Optional, Sequence

import torch
from detectron2.modeling import build_model

from diffusiondet.tooling.model_analysis import (
    BACKBONE, Analysis, Component, analyze_model, backbone_components, count_with_modules, params_of,
)  # fmt: skip

from .modeling.backbone import StableDiffusionBackbone

__all__ = ["ANALYSIS_OPTS", "analyze_config", "sd_backbone_components"]

# Built on CPU (random weights: build_model loads nothing), uncompiled: compilation changes how
# the head runs, not what it computes, and would take minutes on CPU.
ANALYSIS_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.DiffusionDet.COMPILE_HEAD", False,
    "MODEL.DiffusionDet.COMPILE_SAMPLING_STEP", False,
]  # fmt: skip


def sd_backbone_components(backbone: StableDiffusionBackbone, images: torch.Tensor):
    """:data:`~diffusiondet.tooling.model_analysis.BackboneParts` of the frozen-SD backbone on
    (1, 3, Hp, Wp) meta ``images``: the components and the mapper's output features."""
    sd = backbone.components
    vae_flops, posterior, vae_used = count_with_modules(
        lambda: sd.vae.encode(images.to(sd.vae.dtype)).latent_dist, sd.vae.modules()
    )
    # The posterior's sample and the forward-process noise are elementwise: no FLOPs.
    latents = posterior.mean * sd.vae.config.scaling_factor  # (1, 4, h, w)
    t = torch.full((1,), backbone.timestep, dtype=torch.long, device=images.device)
    unet_flops, taps, _ = count_with_modules(lambda: backbone.tapped_unet(latents, t), ())
    mapper_flops, features, _ = count_with_modules(lambda: backbone.features_from_taps(taps), ())
    components = [
        Component("frozen SD VAE encoder", params_of(vae_used), vae_flops, 1, BACKBONE),
        Component(f"frozen SD U-Net (one call, t = {backbone.timestep})", params_of([sd.unet]), unet_flops, 1, BACKBONE),
        Component("channel mapper (the trainable backbone)", params_of([backbone]), mapper_flops, 1, BACKBONE),
        Component("frozen SD text encoder (prompt encoded once, at build)", params_of([sd.text_encoder]), 0.0, 0,
                  "build_time"),
    ]  # fmt: skip
    return components, features


def analyze_config(cfg, steps: Optional[int] = None, boxes: Optional[int] = None,
                   image_hw: Sequence[int] = (800, 1333), detections: Optional[int] = None) -> Analysis:  # fmt: skip
    """Build ``cfg``'s model (:data:`ANALYSIS_OPTS` applied) and count it at S = ``steps`` and
    N = ``boxes`` (default: the config's SAMPLE_STEP and eval boxes) on an (H, W) image."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(ANALYSIS_OPTS)
    model = build_model(cfg)
    steps = steps or cfg.MODEL.DiffusionDet.SAMPLE_STEP
    boxes = boxes or model.eval_num_proposals
    frozen_sd = isinstance(model.backbone, StableDiffusionBackbone)
    parts = sd_backbone_components if frozen_sd else backbone_components
    analysis = analyze_model(model, steps, boxes, image_hw, detections, parts)
    if frozen_sd:
        analysis.notes.append("The SD VAE decoder is not used: not counted.")
    return analysis
