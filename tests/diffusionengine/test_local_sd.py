"""load_local_sd: local diffusers folders only, safetensors only, one clear error otherwise."""
import os
import shutil
import socket

import pytest
import torch

from diffusionengine.local_sd import LocalSDError, load_local_sd
from diffusionengine.tiny_sd import tiny_sd_components

LAYOUT = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _assert_names_layout(message: str, path: str):
    assert repr(path) in message
    for entry in LAYOUT:
        assert entry in message, entry


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_tiny_folders_load_by_path_with_their_weights(variant, tiny_sd1_path, tiny_sd2_path):
    path = tiny_sd1_path if variant == "sd1" else tiny_sd2_path
    sd = load_local_sd(path)
    assert sd.path == path and sd.vae_scale_factor == 8
    sd2 = variant == "sd2"
    assert sd.unet.config.use_linear_projection is sd2
    assert sd.scheduler.config.prediction_type == ("v_prediction" if sd2 else "epsilon")
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    assert sd.scheduler.config.steps_offset == 1 and sd.scheduler.config.timestep_spacing == "leading"
    # The saved weights are the seeded in-memory ones, bit for bit.
    ref = tiny_sd_components(variant=variant, seed=0)
    for name, module in sd.frozen_modules().items():
        saved, built = module.state_dict(), getattr(ref, name).state_dict()
        assert saved.keys() == built.keys(), name
        assert all(torch.equal(saved[k], built[k]) for k in saved), name
        assert not module.training
    ids = sd.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, ref.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids)


def test_seeded_weights_are_bit_identical_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = tiny_sd_components(variant="sd2", seed=3).unet.state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = tiny_sd_components(variant="sd2", seed=3).unet.state_dict()
    c = tiny_sd_components(variant="sd2", seed=4).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dtype_is_applied(tiny_sd1_path):
    sd = load_local_sd(tiny_sd1_path, torch_dtype=torch.float64)
    assert {p.dtype for m in sd.frozen_modules().values() for p in m.parameters()} == {torch.float64}


def test_offline_switches_are_restored(tiny_sd1_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    load_local_sd(tiny_sd1_path)
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


def test_the_network_is_unreachable_in_these_tests():
    # The guard of conftest.py: a loader that tried the hub would fail here, not download.
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with socket.socket() as s, pytest.raises(OSError, match="network access attempted"):
        s.connect(("127.0.0.1", 9))
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"


@pytest.mark.parametrize("path", ["stabilityai/stable-diffusion-2-base", "/no/such/sd/folder"])
def test_hub_id_or_missing_folder_is_one_clear_error(path):
    with pytest.raises(LocalSDError) as info:
        load_local_sd(path)
    assert isinstance(info.value, FileNotFoundError)
    _assert_names_layout(str(info.value), path)
    assert "no such local folder" in str(info.value)
    assert ("hub id" in str(info.value)) == (not path.startswith("/"))


def test_folder_missing_unet_is_one_clear_error(tiny_sd1_path, tmp_path):
    path = str(tmp_path / "sd")
    shutil.copytree(tiny_sd1_path, path)
    shutil.rmtree(os.path.join(path, "unet"))
    with pytest.raises(LocalSDError, match="missing unet") as info:
        load_local_sd(path)
    _assert_names_layout(str(info.value), path)


class _RunsCode:
    """Unpickling this creates the folder ``path``: a pickle that runs code when loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickle_only_weights_are_refused_and_never_unpickled(tiny_sd1_path, tmp_path):
    path = str(tmp_path / "sd")
    shutil.copytree(tiny_sd1_path, path)
    os.remove(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    sentinel = str(tmp_path / "code_ran")
    pickle_file = os.path.join(path, "unet", "diffusion_pytorch_model.bin")
    torch.save({"conv_in.weight": _RunsCode(sentinel)}, pickle_file)
    with pytest.raises(LocalSDError, match="pickle are refused") as info:
        load_local_sd(path)
    assert pickle_file in str(info.value)
    assert not os.path.exists(sentinel)


def test_folder_without_any_weights_names_the_subfolder(tiny_sd1_path, tmp_path):
    path = str(tmp_path / "sd")
    shutil.copytree(tiny_sd1_path, path)
    os.remove(os.path.join(path, "text_encoder", "model.safetensors"))
    with pytest.raises(LocalSDError, match=r"no \*.safetensors weights in text_encoder/"):
        load_local_sd(path)
