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
import argparse
import math
from typing import List, Optional, Sequence

import torch
from detectron2.modeling import build_model

from diffusiondet.tooling.model_analysis import (
    BACKBONE, Analysis, Component, analyze_model, backbone_components, count_with_modules, params_of,
)  # fmt: skip

from .modeling.backbone import StableDiffusionBackbone

__all__ = ["ANALYSIS_OPTS", "SD2_BASE_UNET", "SD2_BASE_VAE", "analyze_config", "sd_backbone_components",
           "sd_layout_components"]

# Built on CPU (random weights: build_model loads nothing), uncompiled: compilation changes how
# the head runs, not what it computes, and would take minutes on CPU.
ANALYSIS_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.DiffusionDet.COMPILE_HEAD", False,
    "MODEL.DiffusionDet.COMPILE_SAMPLING_STEP", False,
]  # fmt: skip


# SD 2-base's published U-Net and VAE layouts (the paper's frozen SD v2), over diffusers' defaults.
SD2_BASE_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                     attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)  # fmt: skip
SD2_BASE_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


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
        Component(f"frozen SD U-Net (one call, t = {backbone.timestep})", params_of([sd.unet]), unet_flops, 1,
                  BACKBONE),
        Component("channel mapper (the trainable backbone)", params_of([backbone]), mapper_flops, 1, BACKBONE),
        Component("frozen SD text encoder (prompt encoded once, at build)", params_of([sd.text_encoder]), 0.0, 0,
                  "build_time"),
    ]  # fmt: skip
    return components, features


def sd_layout_components(image_hw: Sequence[int], unet_config=SD2_BASE_UNET, vae_config=SD2_BASE_VAE,
                         text_tokens: int = 77) -> List[Component]:  # fmt: skip
    """The frozen VAE encoder and U-Net of an SD layout (config dicts, e.g. a folder's
    ``config.json``), built on ``meta`` without weights, for an (H, W) image padded as the SD
    backbone pads it; the U-Net attends to ``text_tokens`` prompt tokens (CLIP's 77). What a
    DiffusionEngine config costs in its SD part when no SD folder is at hand."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(unet_config), AutoencoderKL.from_config(vae_config)
    # The backbone's size_divisibility: VAE factor × the coarsest latent stride of the U-Net.
    divisor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.block_out_channels) - 1)
    images = torch.empty(1, 3, *(math.ceil(x / divisor) * divisor for x in image_hw), device="meta")
    vae_flops, posterior, vae_used = count_with_modules(lambda: vae.encode(images).latent_dist, vae.modules())
    context = torch.empty(1, text_tokens, unet.config.cross_attention_dim, device="meta")
    t = torch.ones(1, dtype=torch.long, device="meta")
    unet_flops, _, _ = count_with_modules(lambda: unet(posterior.mean, t, encoder_hidden_states=context), ())
    return [Component("frozen SD VAE encoder", params_of(vae_used), vae_flops, 1, BACKBONE),
            Component("frozen SD U-Net (one call)", params_of([unet]), unet_flops, 1, BACKBONE)]  # fmt: skip


def analyze_config(cfg, steps: Optional[int] = None, boxes: Optional[int] = None,
                   image_hw: Sequence[int] = (800, 1333),
                   detections: Optional[int] = None) -> Analysis:  # fmt: skip
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


def main(argv=None):
    """``python -m diffusionengine.model_analysis --image-size H W``: SD 2-base's frozen parts."""
    parser = argparse.ArgumentParser(description="GFLOPs of SD 2-base's VAE encoder and U-Net call "
                                     "(DiffusionEngine's frozen backbone), weights not needed")  # fmt: skip
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    args = parser.parse_args(argv)
    print("| component | params (M) | GFLOPs / image |\n| --- | ---: | ---: |")
    for c in sd_layout_components(args.image_size):
        print(f"| {c.name} | {c.params / 1e6:,.2f} | {c.total / 1e9:,.2f} |")


if __name__ == "__main__":
    main()
