"""UNetTaps / tap_channels: DiffusionEngine's grouped U-Net features on the tiny SD U-Net."""
import pytest
import torch

from diffusionengine.taps import UNetTaps, feature_strides, tap_channels, tap_layout
from diffusionengine.tiny_sd import tiny_sd_components

TINY = {1: 96, 2: 96, 4: 128, 8: 192}


@pytest.fixture(scope="module")
def unets():
    return {v: tiny_sd_components(variant=v, seed=0).unet for v in ("sd1", "sd2")}


def _context(batch, seed):
    return torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(seed))


def test_tap_channels_from_the_config_alone():
    # SD 2's U-Net (block_out_channels of stabilityai/stable-diffusion-2-base's unet/config.json).
    sd2 = {"block_out_channels": [320, 640, 1280, 1280], "mid_block_type": "UNetMidBlock2DCrossAttn"}
    assert tap_channels(sd2) == {1: 960, 2: 1600, 4: 1920, 8: 3840}
    assert [(t.name, t.stride) for t in tap_layout(sd2)] == [
        ("down0", 2), ("down1", 4), ("down2", 8), ("down3", 8), ("mid", 8),
        ("up0", 4), ("up1", 2), ("up2", 1), ("up3", 1),
    ]  # fmt: skip
    assert tap_channels({"block_out_channels": [32, 64, 64, 64]}) == TINY
    # Without a mid block, its channels leave the coarsest group.
    assert tap_channels({"block_out_channels": [32, 64, 64, 64], "mid_block_type": None})[8] == 128
    assert feature_strides(sd2, 8, 1) == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    assert feature_strides(sd2, 8, 0) == {"p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("hw", [(8, 8), (9, 13)])
def test_grouped_sizes_channels_and_order(unets, variant, hw):
    unet = unets[variant]
    h, w = hw
    latents = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
    own = {}
    handles = [
        unet.down_blocks[2].register_forward_hook(lambda m, a, out: own.__setitem__("down2", out[0])),
        unet.mid_block.register_forward_hook(lambda m, a, out: own.__setitem__("mid", out)),
        unet.up_blocks[3].register_forward_hook(lambda m, a, out: own.__setitem__("up3", out)),
    ]
    with torch.no_grad(), UNetTaps(unet) as taps:
        unet(latents, 1, encoder_hidden_states=_context(2, 1))
    for handle in handles:
        handle.remove()
    grouped = taps.grouped()
    assert tap_channels(unet.config) == TINY
    assert {s: tuple(g.shape) for s, g in grouped.items()} == {
        s: (2, c, -(-h // s), -(-w // s)) for s, c in TINY.items()
    }
    # Fixed order inside a group: down blocks, mid, up blocks (stride 8: down2 64, down3 64, mid 64;
    # stride 1: up2 64, up3 32).
    assert torch.equal(grouped[8][:, :64], own["down2"]) and torch.equal(grouped[8][:, 128:], own["mid"])
    assert torch.equal(grouped[1][:, 64:], own["up3"])
    assert torch.equal(taps.latent, latents) and taps.timestep == 1


def test_only_the_last_call_is_kept_and_hooks_go_on_exit(unets):
    unet = unets["sd1"]
    first, second = torch.randn(2, 2, 4, 8, 16).unbind(0)
    with torch.no_grad():
        with UNetTaps(unet) as taps:
            unet(first, 900, encoder_hidden_states=_context(2, 1))
            unet(second, 1, encoder_hidden_states=_context(2, 1))
        with UNetTaps(unet) as alone:
            unet(second, 1, encoder_hidden_states=_context(2, 1))
    assert taps.num_calls == 2 and alone.num_calls == 1
    assert torch.equal(taps.latent, second) and taps.timestep == 1
    for s, g in alone.grouped().items():
        assert torch.equal(taps.grouped()[s], g)
    # Hooks removed: a later call records nothing, and no hook is left on any block.
    with torch.no_grad():
        unet(first, 1, encoder_hidden_states=_context(2, 1))
    assert taps.num_calls == 2
    blocks = [unet, unet.mid_block, *unet.down_blocks, *unet.up_blocks]
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


def test_conditional_half_equals_a_conditional_pass(unets):
    # Classifier-free guidance: diffusers runs [uncond, cond] as one batch; the conditional half
    # of every tap must equal a pass on the conditional half alone.
    unet = unets["sd2"]
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    uncond, cond = _context(1, 4).expand(2, -1, -1), _context(2, 5)
    t_cfg = torch.tensor([999, 999, 1, 1])  # a different t on the unconditional half shows which half is kept
    with torch.no_grad():
        with UNetTaps(unet, conditional_half=True) as cfg_taps:
            unet(torch.cat([latents, latents]), t_cfg, encoder_hidden_states=torch.cat([uncond, cond]))
        with UNetTaps(unet) as cond_taps:
            unet(latents, torch.tensor([1, 1]), encoder_hidden_states=cond)
        with UNetTaps(unet) as uncond_taps:
            unet(latents, torch.tensor([999, 999]), encoder_hidden_states=uncond)
    assert torch.equal(cfg_taps.latent, latents) and torch.equal(cfg_taps.timestep, torch.tensor([1, 1]))
    for s, g in cond_taps.grouped().items():
        assert cfg_taps.grouped()[s].shape == g.shape
        torch.testing.assert_close(cfg_taps.grouped()[s], g, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(uncond_taps.grouped()[s], g, atol=1e-3)


def test_errors_name_the_problem(unets):
    unet = unets["sd1"]
    with UNetTaps(unet) as taps:
        pass
    with pytest.raises(RuntimeError, match="recorded no U-Net call"):
        taps.grouped()
    with torch.no_grad(), pytest.raises(ValueError, match="even batch"):
        with UNetTaps(unet, conditional_half=True):
            unet(torch.randn(3, 4, 8, 8), 1, encoder_hidden_states=_context(3, 0))
