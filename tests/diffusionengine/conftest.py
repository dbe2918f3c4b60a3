"""Offline guards and tiny Stable Diffusion folders for the DiffusionEngine tests.

Every test runs with the network unreachable (each socket connect raises) and with
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set: nothing here may download, and a code path that
tries fails loudly instead of hanging. The tiny SD-1.x-like and SD-2.x-like folders
(``diffusionengine.tiny_sd``, random seeded weights, safetensors) are written once per session.
"""
import socket

import pytest


class NetworkAccessError(OSError):
    """A test tried to open a network connection."""


def _refuse(*args, **kwargs):
    raise NetworkAccessError(f"network access attempted in a DiffusionEngine test: {args[1:] or kwargs}")


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Make every socket connect fail and set the Hugging Face offline switches (undone with ``mp``)."""
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket.socket, "connect_ex", _refuse)
    mp.setattr(socket, "create_connection", _refuse)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    block_network(monkeypatch)


def _tiny_folder(tmp_path_factory, variant: str) -> str:
    from diffusionengine.tiny_sd import build_tiny_sd_folder

    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        return build_tiny_sd_folder(str(tmp_path_factory.mktemp(f"tiny_{variant}")), variant=variant, seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_path(tmp_path_factory) -> str:
    """A tiny SD-1.x-like diffusers folder (seed 0)."""
    return _tiny_folder(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory) -> str:
    """A tiny SD-2.x-like diffusers folder (linear projections, v-prediction; seed 0)."""
    return _tiny_folder(tmp_path_factory, "sd2")
