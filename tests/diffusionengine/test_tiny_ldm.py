"""The tiny LDM trainer: finite losses, seeded runs, kill/resume = one shot, a loadable folder,
NaN -> error without a final folder. Tiny non-square images (32 x 48), a few steps each."""
import json
import os

import cv2
import numpy as np
import pytest
import torch

from diffusionengine import tiny_ldm
from diffusionengine.local_sd import load_local_sd
from diffusionengine.tiny_ldm import ImageSet, TinyLDMConfig, load_coco_images, train_tiny_ldm
from diffusionengine.tiny_ldm_data import draw_prompt

NAMES = ["red_circle", "green_square", "blue_triangle", "yellow_diamond", "magenta_cross"]


def _data(n: int = 4, h: int = 32, w: int = 48) -> ImageSet:
    """Grey images with a coloured block whose colour follows the class present."""
    colours = torch.tensor([[220, 40, 40], [40, 190, 60], [50, 80, 235], [235, 210, 40]], dtype=torch.uint8)
    images = torch.full((n, 3, h, w), 110, dtype=torch.uint8)
    for i in range(n):
        images[i, :, 8:24, 8 + 4 * i : 24 + 4 * i] = colours[i % 4, :, None, None]
    return ImageSet(images, [[NAMES[i % 4]] for i in range(n - 1)] + [[]])


def _cfg(**kw) -> TinyLDMConfig:
    base = dict(vae_steps=3, unet_steps=3, batch_size=2, seed=3, size=32, vae_crop=16, warmup=1,
                checkpoint_period=100)
    return TinyLDMConfig(**{**base, **kw})


def _weights(out_dir: str) -> dict:
    state = torch.load(os.path.join(out_dir, tiny_ldm.CHECKPOINT), weights_only=True)
    return {f"{part}.{k}": v for part in ("vae", "unet") for k, v in state[part].items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_losses_finite_and_run_is_seeded(tmp_path):
    data = _data()
    cfg = _cfg(vae_steps=6, vae_lr=3e-3)
    first = train_tiny_ldm(data, str(tmp_path / "a"), cfg, progress=False)
    train_tiny_ldm(data, str(tmp_path / "b"), cfg, progress=False)
    _assert_same(_weights(str(tmp_path / "a")), _weights(str(tmp_path / "b")))
    losses = torch.load(os.path.join(tmp_path / "a", tiny_ldm.CHECKPOINT), weights_only=True)["losses"]
    assert len(losses["vae"]) == 6 and len(losses["unet"]) == 3
    for values in losses.values():
        assert all(np.isfinite(values)) and max(values) < 3 * values[0]
    assert np.mean(losses["vae"][-2:]) < losses["vae"][0]  # the autoencoder learns at once
    assert first == str(tmp_path / "a" / "pipeline")
    # Another seed is another run.
    train_tiny_ldm(data, str(tmp_path / "c"), _cfg(vae_steps=6, vae_lr=3e-3, seed=4), progress=False)
    other = _weights(str(tmp_path / "c"))
    assert not torch.equal(other["unet.conv_in.weight"], _weights(str(tmp_path / "a"))["unet.conv_in.weight"])


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
@pytest.mark.parametrize("stop_after", [2, 4])  # at the stage boundary, inside the U-Net stage
def test_kill_and_resume_equals_one_shot(tmp_path, stop_after):
    data, cfg = _data(), _cfg(vae_steps=2, unet_steps=3, checkpoint_period=1)
    train_tiny_ldm(data, str(tmp_path / "once"), cfg, progress=False)
    assert train_tiny_ldm(data, str(tmp_path / "twice"), cfg, progress=False, stop_after=stop_after) is None
    assert not os.path.exists(tmp_path / "twice" / "pipeline")
    # The global RNG moves between the sessions: the run must not depend on it.
    torch.manual_seed(123)
    train_tiny_ldm(data, str(tmp_path / "twice"), cfg, progress=False)
    _assert_same(_weights(str(tmp_path / "once")), _weights(str(tmp_path / "twice")))
    saved = load_local_sd(str(tmp_path / "twice" / "pipeline"))
    _assert_same({k: v for k, v in _weights(str(tmp_path / "once")).items() if k.startswith("unet.")},
                 {f"unet.{k}": v for k, v in saved.unet.state_dict().items()})


def test_saved_folder_loads_with_the_measured_scaling_factor(tmp_path):
    data = _data()
    pipeline = train_tiny_ldm(data, str(tmp_path), _cfg(), progress=False)
    sd = load_local_sd(pipeline)
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert sd.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"], rel=1e-6)
    # scaling_factor = 1 / std of the latents: scaled samples of the training images have std 1.
    with torch.no_grad():
        posterior = sd.vae.encode(data.images.float() / 127.5 - 1).latent_dist
        z = posterior.sample(torch.Generator().manual_seed(0)) * sd.vae.config.scaling_factor
    assert 0.8 < float(z.std()) < 1.2 and sd.vae.config.scaling_factor != 0.18215
    assert summary["config"]["unet_steps"] == 3 and all(np.isfinite(list(summary["final_loss"].values())))
    # A finished run returns at once, without training again.
    calls = []
    original = tiny_ldm._vae_loss
    tiny_ldm._vae_loss = lambda *a: calls.append(1) or original(*a)
    try:
        assert train_tiny_ldm(data, str(tmp_path), _cfg(), progress=False) == pipeline
    finally:
        tiny_ldm._vae_loss = original
    assert not calls


def test_nan_loss_raises_and_writes_no_pipeline(tmp_path, monkeypatch):
    calls = []
    original = tiny_ldm._unet_loss

    def nan_on_second(*args):
        calls.append(1)
        loss = original(*args)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(tiny_ldm, "_unet_loss", nan_on_second)
    with pytest.raises(FloatingPointError, match=r"unet loss is nan at step 1"):
        train_tiny_ldm(_data(), str(tmp_path), _cfg(checkpoint_period=1), progress=False)
    assert not os.path.exists(tmp_path / "pipeline") and not os.path.exists(tmp_path / "summary.json")
    # The checkpoint kept is the last finite one (after U-Net step 1).
    state = torch.load(tmp_path / tiny_ldm.CHECKPOINT, weights_only=True)
    assert (state["stage"], state["step"]) == ("unet", 1)
    assert all(torch.isfinite(v).all() for v in state["unet"].values() if v.is_floating_point())


def test_resume_with_another_config_names_the_checkpoint(tmp_path):
    train_tiny_ldm(_data(), str(tmp_path), _cfg(), progress=False, stop_after=1)
    with pytest.raises(ValueError, match="checkpoint.pth was written by another config"):
        train_tiny_ldm(_data(), str(tmp_path), _cfg(batch_size=3), progress=False)


def test_prompts_name_up_to_four_present_classes_and_drop_some():
    gen = torch.Generator().manual_seed(0)
    prompts = [draw_prompt(NAMES, 0.1, gen) for _ in range(2000)]
    empty = sum(p == "" for p in prompts) / len(prompts)
    assert 0.07 < empty < 0.13
    named = [p for p in prompts if p]
    assert all(p.startswith("a photo, with ") and p.count(",") == 4 for p in named)  # 4 names
    assert len(set(named)) > 60  # random subsets and orders
    assert draw_prompt([], 0.1, gen) == ""
    assert draw_prompt(["red_circle"], 0.0, gen) == (
        "a photo, with red circle in the realistic photo.")


def test_load_coco_images_rgb_resized_with_present_classes(tmp_path):
    image = np.zeros((24, 40, 3), np.uint8)
    image[:, :, 0] = 200  # red in RGB
    cv2.imwrite(str(tmp_path / "a.png"), image[:, :, ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), image[:, :, ::-1])
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
            "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
            "annotations": [{"image_id": 1, "category_id": 2}, {"image_id": 1, "category_id": 1},
                            {"image_id": 1, "category_id": 2}]}
    with open(tmp_path / "c.json", "w") as f:
        json.dump(coco, f)
    data = load_coco_images(str(tmp_path / "c.json"), str(tmp_path), 16)
    assert data.images.shape == (2, 3, 16, 16) and data.images.dtype == torch.uint8
    assert int(data.images[0, 0].min()) == 200 and int(data.images[0, 1:].max()) == 0
    assert data.class_names == [["x", "y"], []]
