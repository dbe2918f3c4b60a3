"""The device of the device-capable tests: ``DIFFDET_TEST_DEVICE`` (default ``cpu``).

``tools/dev/device_check.sh`` sets it to ``cuda`` and runs the test files that use the ``device``
fixture. A requested device that is not there FAILS the test instead of skipping it: a GPU check
that quietly ran on the CPU would report a pass it never earned.

Use: ``from tests.device import device  # noqa: F401`` in a test module, then a ``device``
argument.
"""
import os

import pytest
import torch

ENV_VAR = "DIFFDET_TEST_DEVICE"


def selected_device() -> torch.device:
    """``torch.device`` named by ``DIFFDET_TEST_DEVICE``; fails the calling test if it is absent."""
    name = os.environ.get(ENV_VAR, "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{ENV_VAR}={name}, but torch.cuda.is_available() is False")
    return device


@pytest.fixture
def device() -> torch.device:
    return selected_device()
