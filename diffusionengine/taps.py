"""Feature taps on a diffusers ``UNet2DConditionModel``: DiffusionEngine's multi-scale features.

DiffusionEngine (arXiv 2309.03893, Sec. 3, Eq. 4: one U-Net pass on a once-noised latent) reads
the output of every down block (after its downsampler), of the mid block and of every up block
(after its upsampler), groups them by spatial stride relative to the latent, and concatenates
each group on channels. For SD 2 that gives, per latent stride (pixel stride = 8 x it)::

    1: up2 640 + up3 320                  =  960
    2: down0 320 + up1 1280               = 1600
    4: down1 640 + up0 1280               = 1920
    8: down2 1280 + down3 1280 + mid 1280 = 3840

Shape shorthand: B images, C channels, (h, w) the latent size; a tap of latent stride s has
size (ceil(h / s), ceil(w / s)) (diffusers' stride-2 convs round up; the up blocks are given
the skip connections' sizes).

Only torch and the standard library here: the config layer reads the strides and channels from
a U-Net config (a dict or ``unet.config``) without building a model.
"""
import math
from functools import partial
from typing import Dict, List, Mapping, NamedTuple, Optional

import torch

__all__ = ["Tap", "UNetTaps", "feature_strides", "tap_channels", "tap_layout"]


class Tap(NamedTuple):
    """One tapped block: ``name`` ("down0", "mid", "up3"), latent ``stride``, ``channels``."""

    name: str
    stride: int
    channels: int


def tap_layout(unet_config: Mapping) -> List[Tap]:
    """The taps of a U-Net, in concatenation order (down blocks, mid block, up blocks).

    Args:
        unet_config: ``unet.config`` or the dict of the folder's ``unet/config.json``.
    """
    channels = list(unet_config["block_out_channels"])
    levels = len(channels)
    taps, stride = [], 1
    for i, c in enumerate(channels):
        # diffusers gives every down block but the last a stride-2 downsampler.
        stride *= 2 if i < levels - 1 else 1
        taps.append(Tap(f"down{i}", stride, c))
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        taps.append(Tap("mid", stride, channels[-1]))
    for i, c in enumerate(reversed(channels)):
        # ... and every up block but the last an upsampler.
        stride //= 2 if i < levels - 1 else 1
        taps.append(Tap(f"up{i}", stride, c))
    return taps


def tap_channels(unet_config: Mapping) -> Dict[int, int]:
    """Latent stride -> channels of the concatenated taps of that stride (e.g. tiny SD:
    {1: 96, 2: 96, 4: 128, 8: 192}; SD 2: {1: 960, 2: 1600, 4: 1920, 8: 3840})."""
    out: Dict[int, int] = {}
    for tap in tap_layout(unet_config):
        out[tap.stride] = out.get(tap.stride, 0) + tap.channels
    return dict(sorted(out.items()))


def feature_strides(unet_config: Mapping, vae_scale_factor: int, extra_levels: int = 0) -> Dict[str, int]:
    """Output name -> pixel stride of the features: ``p{log2 stride}`` for each tap group (SD:
    p3..p6 at 8..64), then ``extra_levels`` more levels, each at twice the previous stride."""
    strides = [vae_scale_factor * s for s in tap_channels(unet_config)]
    strides += [strides[-1] * 2 ** (k + 1) for k in range(extra_levels)]
    return {f"p{int(math.log2(s))}": s for s in strides}


class UNetTaps:
    """Context manager recording the taps of the last call of ``unet``.

    Forward hooks sit on every down block (its first output), the mid block and every up block;
    a forward pre-hook on the U-Net records the call's input latents (B, 4, h, w) and timestep.
    Each call overwrites the previous one's records (``num_calls`` counts the calls), so a
    sampling loop leaves the taps of its final step. The hooks are removed on exit; the records
    stay readable.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        conditional_half: keep the second half of the batch of every record: under
            classifier-free guidance diffusers runs [unconditional, conditional] as one batch,
            and DiffusionEngine keeps the conditional half (``chunk(2)[1]``).
    """

    def __init__(self, unet, conditional_half: bool = False):
        self.unet = unet
        self.conditional_half = conditional_half
        self.layout = tap_layout(unet.config)
        self.num_calls = 0
        self.latent: Optional[torch.Tensor] = None  # (B, 4, h, w) input of the last call
        self.timestep = None  # its timestep, as given (halved when it has a batch dimension)
        self.taps: Dict[str, torch.Tensor] = {}  # tap name -> (B, C, ceil(h/s), ceil(w/s))
        self._handles = []

    def _blocks(self):
        unet = self.unet
        blocks = [(f"down{i}", b) for i, b in enumerate(unet.down_blocks)]
        blocks += [("mid", unet.mid_block)] if unet.mid_block is not None else []
        blocks += [(f"up{i}", b) for i, b in enumerate(unet.up_blocks)]
        names = [name for name, _ in blocks]
        if names != [tap.name for tap in self.layout]:
            raise ValueError(f"U-Net blocks {names} do not match its config's {[t.name for t in self.layout]}")
        return blocks

    def __enter__(self) -> "UNetTaps":
        blocks = self._blocks()
        self._handles.append(self.unet.register_forward_pre_hook(self._on_call, with_kwargs=True))
        for name, block in blocks:
            self._handles.append(block.register_forward_hook(partial(self._on_output, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _half(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conditional_half:
            return x
        if x.shape[0] % 2:
            raise ValueError(f"conditional_half needs an even batch ([uncond, cond]), got {x.shape[0]}")
        return x[x.shape[0] // 2 :]

    def _on_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        self.num_calls += 1
        self.taps = {}
        self.latent = self._half(sample.detach())
        batched = torch.is_tensor(timestep) and timestep.dim() > 0 and timestep.shape[0] == sample.shape[0] > 1
        self.timestep = self._half(timestep.detach()) if batched else timestep

    def _on_output(self, name, module, args, output):
        # Down blocks return (hidden_states, skip connections); the others a tensor.
        hidden = output[0] if isinstance(output, tuple) else output
        self.taps[name] = self._half(hidden.detach())

    def grouped(self) -> Dict[int, torch.Tensor]:
        """Latent stride -> (B, C_s, ceil(h / s), ceil(w / s)): the last call's taps of each
        stride concatenated on channels in layout order (down blocks, mid, up blocks)."""
        if self.num_calls == 0:
            raise RuntimeError("UNetTaps recorded no U-Net call (call the U-Net inside the `with` block)")
        h, w = self.latent.shape[-2:]
        groups: Dict[int, List[torch.Tensor]] = {}
        for tap in self.layout:
            if tap.name not in self.taps:
                raise RuntimeError(f"the last U-Net call did not run block {tap.name}")
            feature = self.taps[tap.name]
            expected = (math.ceil(h / tap.stride), math.ceil(w / tap.stride))
            if tuple(feature.shape[-2:]) != expected:
                raise RuntimeError(
                    f"tap {tap.name}: size {tuple(feature.shape[-2:])} is not {expected} (latent {h}x{w},"
                    f" stride {tap.stride})"
                )
            groups.setdefault(tap.stride, []).append(feature)
        return {stride: torch.cat(features, dim=1) for stride, features in sorted(groups.items())}
