"""A tiny, fully offline Stable-Diffusion-like model for tests and CPU experiments.

Same layout as SD 1.x / 2.x (a /8 VAE, a 4-level U-Net with cross-attention in its first three
down and last three up blocks, a CLIP text encoder and tokenizer, a DDIM scheduler), built from
constructor arguments only: no weights, no network (docs: the DiffusionEngine reference, §2).

* ``variant="sd1"``: SD-1.x-like (attention through 1x1 convs, epsilon prediction).
* ``variant="sd2"``: SD-2.x-like (``use_linear_projection=True``, ``v_prediction``, a per-level
  head count, as SD 2's ``attention_head_dim`` list).

The U-Net taps of this model have {1: 96, 2: 96, 4: 128, 8: 192} channels per latent stride
(see ``diffusionengine.taps.tap_channels``). Weights are random but seeded: the same ``seed``
gives bit-identical weights, whatever the caller's global RNG state (which is left untouched).
"""
import json
import os
import tempfile

import torch

from .local_sd import SDComponents

__all__ = ["VARIANTS", "build_tiny_sd_folder", "save_sd_folder", "tiny_sd_components"]

VARIANTS = ("sd1", "sd2")
TEXT_HIDDEN = 32  # CLIP width; the U-Net's cross_attention_dim must equal it
MAX_TOKENS = 77  # CLIP's context length, as in SD
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _char_level_clip_tokenizer():
    """A CLIP BPE tokenizer without merges: every character is a token (doc §2.1).

    The vocabulary is the 256 byte-level characters, the same with the end-of-word mark
    ``</w>`` and the two special tokens: 514 entries, written to a temporary folder that is
    deleted once the tokenizer has read it.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    with tempfile.TemporaryDirectory(prefix="tiny_sd_tokenizer_") as folder:
        vocab_file = os.path.join(folder, "vocab.json")
        merges_file = os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump({token: i for i, token in enumerate(tokens)}, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS)


def _text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(tokenizer.pad_token),
    )
    return CLIPTextModel(config)


def _unet(variant: str, sample_size: int):
    from diffusers import UNet2DConditionModel

    sd2 = variant == "sd2"
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN,
        # diffusers' attention_head_dim is the number of heads per level; SD 2 gives one per
        # level (5, 10, 20, 20), SD 1 one for all (8).
        attention_head_dim=(2, 4, 4, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    # Four levels: three downsamplings, so vae_scale_factor = 2 ** (4 - 1) = 8 as in SD.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )


def _scheduler(variant: str):
    from diffusers import DDIMScheduler

    # SD's training schedule with "leading" spacing and steps_offset 1 (doc §2.3): the last
    # DDIM step of a 50-step schedule is then t = 1, the adapter's feature timestep.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        prediction_type="v_prediction" if variant == "sd2" else "epsilon",
    )


def tiny_sd_components(*, variant: str = "sd1", seed: int = 0, sample_size: int = 16) -> SDComponents:
    """Build the tiny model in memory (fp32, CPU, eval mode).

    Args:
        variant: "sd1" or "sd2" (see the module docstring).
        seed: seeds the random initialisation; the same seed gives bit-identical weights.
        sample_size: the U-Net's nominal latent size (images of 8 x sample_size pixels); any
            latent size runs, this only fills the configs.
    Returns:
        ``SDComponents`` with ``path`` "" (not saved).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    tokenizer = _char_level_clip_tokenizer()
    # fork_rng: the caller's global RNG state is the same after the call as before it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _text_encoder(tokenizer)
        unet = _unet(variant, sample_size)
        vae = _vae(sample_size)
    return SDComponents(
        vae=vae.eval(),
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=_scheduler(variant),
        path="",
    )


def save_sd_folder(components: SDComponents, out_dir: str) -> str:
    """Write ``components`` as a diffusers Stable Diffusion folder (weights as safetensors).

    The folder loads with ``diffusionengine.local_sd.load_local_sd(out_dir)``; returns out_dir.
    """
    components.pipeline().save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_sd_folder(out_dir: str, *, variant: str = "sd1", seed: int = 0, sample_size: int = 16) -> str:
    """``save_sd_folder(tiny_sd_components(...), out_dir)``: a tiny SD folder on disk; returns out_dir."""
    components = tiny_sd_components(variant=variant, seed=seed, sample_size=sample_size)
    return save_sd_folder(components, out_dir)
