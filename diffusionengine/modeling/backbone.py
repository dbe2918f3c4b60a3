"""The frozen Stable Diffusion backbone of DiffusionEngine (arXiv 2309.03893, Sec. 3, Eq. 4).

An image x in [-1, 1] is VAE-encoded, noised once at t = ``timestep`` (paper: t = 1), and run
once through the U-Net with a fixed prompt embedding (paper: the empty prompt). The outputs of
its down, mid and up blocks, grouped by stride (``diffusionengine.taps``), go through a
trainable channel mapper: per level a 1x1 conv + GroupNorm(32) to ``out_channels``, plus
``extra_levels`` 3x3 stride-2 conv + GroupNorm levels, the first on the coarsest raw taps, the
next on the previous extra level (the paper's ChannelMapper adds one).

Shape shorthand: B images, (H, W) the padded input (multiples of the VAE factor 8), C the
mapper width. For SD (4 U-Net levels): p3, p4, p5, p6 at strides 8, 16, 32, 64, then p7, ...,
each (B, C, ceil(H / stride), ceil(W / stride)).

The diffusion model (VAE, U-Net, text encoder) is frozen and not a submodule: it is not in
``parameters()`` (so not in the optimizer), not in ``state_dict()`` (so not in checkpoints),
always in eval mode and run without gradients; ``_apply`` moves and casts it with the backbone
(``.to(device)``, ``.double()``, ...). Only the channel mapper trains.

Noise (the VAE posterior sample and the forward-process noise) comes from one generator per
image, seeded by (``seed``, CRC32 of the image tensor's bytes): an image gets the same features
in any batch position and in training, evaluation and sweeps alike. The bytes are those of the
padded input, so the same picture padded to another size gets other noise (as it gets other
features in the padded border anyway). ``seed`` < 0 (detectron2's "unseeded") draws from
torch's global generator instead.
"""
import struct
import zlib
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from fvcore.nn import weight_init

from ..local_sd import SDComponents, load_local_sd
from ..taps import UNetTaps, feature_strides, tap_channels

__all__ = ["StableDiffusionBackbone", "build_stable_diffusion_backbone", "encode_prompt", "image_seed"]

GN_GROUPS = 32  # GroupNorm(32) of the paper's ChannelMapper


def encode_prompt(components: SDComponents, prompt: str) -> torch.Tensor:
    """(1, L, D) text-encoder hidden states of ``prompt``, as the SD pipeline conditions the
    U-Net on it (diffusers' ``StableDiffusionPipeline.encode_prompt``, no guidance)."""
    pipe = components.pipeline()
    device = next(components.text_encoder.parameters()).device
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, device, 1, do_classifier_free_guidance=False)
    return embeds


def image_seed(seed: int, image: torch.Tensor) -> int:
    """The generator seed of one image: CRC32 of (``seed``, CRC32 of the (C, H, W) tensor's
    bytes). 32 bits, because a CPU generator's Mersenne twister keeps only the low 32 bits
    of its seed (seed and image side by side in 64 bits would drop the seed)."""
    data = image.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return zlib.crc32(struct.pack("<qI", seed, zlib.crc32(data)))


def _gn_groups(out_channels: int) -> int:
    """GroupNorm(32) as the paper's ChannelMapper, with at least 2 channels per group: a coarse
    level is 1x1 for images up to its stride (p7 below 128 px), and a group of one value there
    cannot be normalised (torch raises; 256 channels, the paper's, keep 32 groups)."""
    return min(GN_GROUPS, out_channels // 2)


def _gn_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> Conv2d:
    conv = Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
        bias=False, norm=nn.GroupNorm(_gn_groups(out_channels), out_channels),
    )  # fmt: skip
    weight_init.c2_xavier_fill(conv)
    return conv


class StableDiffusionBackbone(Backbone):
    """Frozen SD U-Net features + a trainable channel mapper (see the module docstring)."""

    # Every trainable parameter is the new channel mapper: SOLVER.BACKBONE_MULTIPLIER (meant to
    # slow a pre-trained backbone) does not apply to it (diffusiondet/engine/optimizer.py).
    lr_multiplier_applies = False

    @configurable
    def __init__(
        self,
        *,
        components: SDComponents,
        out_channels: int,
        timestep: int = 1,
        prompt: str = "",
        extra_levels: int = 1,
        seed: int = 0,
    ):
        """
        Args:
            components: the SD model (``load_local_sd`` / ``tiny_sd_components``); frozen here.
            out_channels: C, width of every output level (a multiple of 32).
            timestep: t of the one noising step (paper: 1).
            prompt: text of the feature pass, encoded once here (paper Eq. 4: "").
            extra_levels: 3x3 stride-2 levels after the coarsest tap level.
            seed: seeds each image's noise with the image's CRC32; < 0: global RNG.
        """
        super().__init__()
        steps = components.scheduler.config.num_train_timesteps
        if not 0 <= timestep < steps:
            raise ValueError(f"timestep must be in [0, {steps - 1}] (the scheduler's), got {timestep}")
        if out_channels < GN_GROUPS or out_channels % GN_GROUPS:
            raise ValueError(f"out_channels must be a multiple of {GN_GROUPS} (GroupNorm), got {out_channels}")
        if extra_levels < 0:
            raise ValueError(f"extra_levels must be >= 0, got {extra_levels}")
        # A plain attribute, not a submodule: see the module docstring.
        self._sd = components
        for module in components.frozen_modules().values():
            module.eval().requires_grad_(False)
        self.timestep = timestep
        self.seed = seed
        # Not persistent: derived from the frozen model and the prompt, never checkpointed.
        self.register_buffer("prompt_embeds", encode_prompt(components, prompt).detach(), persistent=False)

        channels = tap_channels(components.unet.config)  # latent stride -> tap channels
        self._latent_strides: List[int] = list(channels)
        strides = feature_strides(components.unet.config, components.vae_scale_factor, extra_levels)
        self._out_features = list(strides)
        self._out_feature_strides = strides
        self._out_feature_channels = {name: out_channels for name in strides}
        self.lateral_convs = nn.ModuleList(_gn_conv(c, out_channels, 1) for c in channels.values())
        coarsest = channels[self._latent_strides[-1]]
        self.extra_convs = nn.ModuleList(
            _gn_conv(coarsest if k == 0 else out_channels, out_channels, 3, stride=2) for k in range(extra_levels)
        )
        # Padding to this makes every tap level an exact fraction of the input.
        self._size_divisibility = components.vae_scale_factor * self._latent_strides[-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        if input_shape is not None and input_shape.channels != 3:
            raise ValueError(f"the SD backbone takes 3-channel RGB images, got {input_shape.channels}")
        e = cfg.MODEL.DiffusionEngine
        return {
            "components": load_local_sd(e.SD_PATH),
            "out_channels": cfg.MODEL.FPN.OUT_CHANNELS,
            "timestep": e.TIMESTEP,
            "prompt": e.PROMPT,
            "extra_levels": e.EXTRA_LEVELS,
            "seed": cfg.SEED,
        }

    @property
    def components(self) -> SDComponents:
        """The frozen SD model (shared, not copied: moving the backbone moves it)."""
        return self._sd

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._sd.frozen_modules().values():
            module.eval()  # frozen: dropout off, whatever the detector's mode
        return self

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .float() / .double() reach the frozen model as well.
        super()._apply(fn, recurse)
        for module in self._sd.frozen_modules().values():
            module._apply(fn)
        return self

    def noise_generators(self, images: torch.Tensor) -> Optional[List[torch.Generator]]:
        """One CPU generator per image of (B, 3, H, W) ``images`` (see ``image_seed``); None
        with a negative seed. CPU generators give the same noise on every device."""
        if self.seed < 0:
            return None
        return [torch.Generator().manual_seed(image_seed(self.seed, image)) for image in images]

    @torch.no_grad()
    def diffusion_features(self, images: torch.Tensor) -> Dict[int, torch.Tensor]:
        """The frozen part: (B, 3, H, W) RGB in [-1, 1] -> latent stride s -> (B, C_s, H/8s, W/8s)
        grouped U-Net taps (H, W multiples of the VAE factor; ceil sizes below it)."""
        from diffusers.utils.torch_utils import randn_tensor

        vae, unet, scheduler = self._sd.vae, self._sd.unet, self._sd.scheduler
        factor = self._sd.vae_scale_factor
        b, _, h, w = images.shape
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} must be a multiple of the VAE factor {factor} (pad it)")
        generators = self.noise_generators(images)
        # The VAE's posterior sample, then the forward-process noise, from the same generators.
        posterior = vae.encode(images.to(vae.dtype)).latent_dist
        latents = posterior.sample(generator=generators) * vae.config.scaling_factor  # (B, 4, h/8, w/8)
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        t = torch.full((b,), self.timestep, device=latents.device, dtype=torch.long)  # (B,)
        noisy = scheduler.add_noise(latents, noise, t)  # sqrt(a_t) z + sqrt(1 - a_t) eps
        return self.tapped_unet(noisy, t)

    @torch.no_grad()
    def tapped_unet(self, latents: torch.Tensor, t: torch.Tensor, context: Optional[torch.Tensor] = None):
        """One U-Net call on (B, 4, h, w) noisy ``latents`` at timesteps ``t`` (B,), conditioned on
        ``context`` (B, L, D) (default: the backbone's prompt) -> its grouped taps. The data
        engine's labels come from the same taps of a generation's last call (zero extra calls)."""
        unet = self._sd.unet
        if context is None:
            context = self.prompt_embeds.expand(latents.shape[0], -1, -1)  # (B, L, D)
        with UNetTaps(unet) as taps:
            unet(latents.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype))
        return taps.grouped()

    def features_from_taps(self, grouped: Dict[int, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The channel mapper alone: ``UNetTaps.grouped()`` (latent stride -> (B, C_s, h_s, w_s))
        -> output name -> (B, C, h_s, w_s), extra levels at half the previous size (ceil)."""
        missing = [s for s in self._latent_strides if s not in grouped]
        if missing:
            raise KeyError(f"grouped taps lack latent strides {missing} (have {sorted(grouped)})")
        dtype = self.lateral_convs[0].weight.dtype
        levels = [grouped[s].to(dtype) for s in self._latent_strides]
        outs = [conv(x) for conv, x in zip(self.lateral_convs, levels)]
        for k, conv in enumerate(self.extra_convs):
            outs.append(conv(levels[-1] if k == 0 else outs[-1]))
        return dict(zip(self._out_features, outs))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) RGB in [-1, 1] -> {p3: (B, C, H/8, W/8), ..., p6: (.., H/64, W/64), p7..}."""
        return self.features_from_taps(self.diffusion_features(x))


@BACKBONE_REGISTRY.register()
def build_stable_diffusion_backbone(cfg, input_shape: ShapeSpec) -> StableDiffusionBackbone:
    """The frozen-SD backbone of ``MODEL.DiffusionEngine`` (``MODEL.BACKBONE.NAME``)."""
    return StableDiffusionBackbone(cfg, input_shape)
