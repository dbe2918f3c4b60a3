import os

import pytest
import torch

PARITY_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_parity_v1.pt")


@pytest.fixture(scope="session")
def parity():
    """Golden numbers recorded from the official implementation (see tests/fixtures/README.md)."""
    return torch.load(PARITY_FIXTURE, weights_only=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
