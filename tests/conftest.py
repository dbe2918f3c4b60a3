import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PARITY_FIXTURE = os.path.join(FIXTURES, "official_parity_v1.pt")
PARITY_V2_FIXTURE = os.path.join(FIXTURES, "official_parity_v2.pt")


@pytest.fixture(scope="session")
def parity():
    """Golden numbers recorded from the official implementation (see tests/fixtures/README.md)."""
    return torch.load(PARITY_FIXTURE, weights_only=False)


@pytest.fixture(scope="session")
def parity_v2():
    """The official v2 recording (tamed head, free-running sampling), see tests/fixtures/README.md.

    The repository stores v2 as the entries that differ from v1 (``base`` names v1); v1 supplies
    the rest, and the 12 stored ``bboxes_delta`` tensors replace v1's in ``head_state_dict``.
    A complete copy of the shared file (no ``base`` key) is used as is.
    """
    fx = torch.load(PARITY_V2_FIXTURE, weights_only=False)
    base_name = fx.pop("base", None)
    if base_name is None:
        return fx
    full = torch.load(os.path.join(FIXTURES, base_name), weights_only=False)
    for key, value in fx.items():
        full[key] = {**full[key], **value} if key == "head_state_dict" else value
    return full


INST_PARITY_FIXTURE = os.path.join(FIXTURES, "official_inst_parity_v1.pt")
INST_SAME_AS_BASE = "<same as base>"


def _fill_from_base(stored, base):
    """Copy of ``stored`` with each ``INST_SAME_AS_BASE`` marker replaced by base's tensor at the
    same path (same dict keys and list/tuple positions)."""
    if isinstance(stored, str) and stored == INST_SAME_AS_BASE:
        return base.clone()  # clone: tests that edit it in place must not change parity_v2
    if isinstance(stored, dict):
        bases = base if isinstance(base, dict) else {}
        return {k: _fill_from_base(v, bases.get(k)) for k, v in stored.items()}
    if isinstance(stored, (list, tuple)):
        same_length = isinstance(base, (list, tuple)) and len(base) == len(stored)
        bases = base if same_length else [None] * len(stored)
        return type(stored)(_fill_from_base(v, b) for v, b in zip(stored, bases))
    return stored


@pytest.fixture(scope="session")
def inst_parity(parity_v2):
    """The official DiffusionInst recording, see tests/fixtures/README.md.

    The repository stores it with every tensor that equals the complete v2 recording's tensor at
    the same path replaced by the string ``INST_SAME_AS_BASE`` (``base`` names v2, rebuilt by
    ``parity_v2``). A complete copy of the shared file (no ``base`` key) is used as is.
    """
    fx = torch.load(INST_PARITY_FIXTURE, weights_only=False)
    base_name = fx.pop("base", None)
    if base_name is None:
        return fx
    assert base_name == os.path.basename(PARITY_V2_FIXTURE), base_name
    return _fill_from_base(fx, parity_v2)


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny random SD-1.x-like diffusers folder (diffusionengine.tiny_sd), for the tests that
    build DiffusionEngine configs outside tests/diffusionengine (which has its own, offline)."""
    from diffusionengine.tiny_sd import build_tiny_sd_folder

    return build_tiny_sd_folder(str(tmp_path_factory.mktemp("tiny_sd")), variant="sd1", seed=0)


def diffusionengine_opts(path, sd_path):
    """``SD_PATH`` for a DiffusionEngine YAML (their SD folder is the user's), nothing otherwise."""
    name = os.path.basename(path)
    return ["MODEL.DiffusionEngine.SD_PATH", sd_path] if name.startswith(("diffengine", "Base-DiffusionEngine")) else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
