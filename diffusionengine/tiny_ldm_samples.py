"""What a human looks at after :func:`diffusionengine.tiny_ldm.train_tiny_ldm`: ``samples.png``,
text-to-image samples of class prompts (one row per prompt) under a row of TRAIN images and a row
of their VAE reconstructions, so one can see whether the model learned the shapes and colours.

Shape shorthand: N images, H W pixels.
"""
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .image_grid import grid, write_rgb
from .prompts import class_prompt

__all__ = ["reconstruct", "sample_prompts", "write_samples"]


def _pipeline(components, cls_name: str = "StableDiffusionPipeline"):
    import diffusers

    return getattr(diffusers, cls_name)(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


@torch.no_grad()
def sample_prompts(components, prompts: Sequence[str], *, size: int, seed: int, steps: int = 25,
                   guidance: float = 4.0) -> np.ndarray:
    """txt2img of each prompt (DDIM, eta 0, classifier-free guidance), image i from the seed
    (seed, i): returns (N, size, size, 3) uint8 RGB."""
    pipe = _pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
    images = pipe(list(prompts), height=size, width=size, num_inference_steps=steps,
                  guidance_scale=guidance, generator=generators, output_type="np").images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> np.ndarray:
    """VAE reconstruction (posterior mean) of (N, 3, H, W) uint8 RGB images -> (N, H, W, 3) uint8."""
    x = images.float() / 127.5 - 1.0
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def write_samples(components, out_dir: str, class_names: Sequence[str], *,
                  references: Optional[torch.Tensor] = None, per_prompt: int = 4, seed: int = 0) -> str:
    """Write ``<out_dir>/samples.png``: optional reference images (N, 3, H, W uint8) and their
    reconstructions, then ``per_prompt`` samples for each single-class prompt, one two-class
    prompt and the empty prompt. Returns the path."""
    size = components.unet.config.sample_size * 8
    rows, captions = [], []
    if references is not None:
        refs = references[:per_prompt]
        rows += [list(refs.permute(0, 2, 3, 1).numpy()), list(reconstruct(components.vae, refs))]
        captions += ["train images", "VAE reconstructions"]
    prompt_names = [[n] for n in class_names] + [list(class_names[:2]), []]
    prompts = [class_prompt(n) if n else "" for n in prompt_names]
    images = sample_prompts(components, [p for p in prompts for _ in range(per_prompt)], size=size, seed=seed)
    for i, names in enumerate(prompt_names):
        rows.append(list(images[i * per_prompt : (i + 1) * per_prompt]))
        captions.append(", ".join(names) if names else "(empty prompt)")
    path = os.path.join(out_dir, "samples.png")
    write_rgb(path, grid(rows, captions))
    return path
