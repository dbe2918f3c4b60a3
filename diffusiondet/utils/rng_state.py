"""The process-global random number generators (python, numpy, torch CPU and CUDA) as data.

A training run is reproducible to the bit only if every draw it makes is a function of its seed:
the checkpoint must carry these states so that a resumed run continues the same sequence
(``docs/reproducibility.md``), and code that draws on the side (an evaluation during training, an
image mapped in the main process) must leave them as it found them.
"""
import contextlib
import random
from typing import Dict, Iterator

import numpy as np
import torch

__all__ = ["capture_rng_state", "mixed_seed", "preserved_rng_state", "restore_rng_state", "seeded_rngs"]


def capture_rng_state() -> Dict:
    """The states of python's, numpy's and torch's global generators (CUDA ones if initialised),
    as tensors, tuples and numbers only: ``torch.load(weights_only=True)`` reads them back."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict) -> None:
    """Set the global generators to a ``capture_rng_state`` result (CUDA ones only if recorded
    and this process has as many devices)."""
    random.setstate(_python_state(state["python"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _python_state(value):
    # A checkpoint's round trip may turn python's (version, tuple, gauss) state into lists.
    version, internal, gauss = value
    return version, tuple(internal), gauss


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run the body, then put every global generator back where it was."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the body with python, numpy and torch (CPU) seeded from ``seed``, then restore them:
    whatever process or thread runs it, the body draws the same numbers."""
    with preserved_rng_state():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        yield


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers: independent streams for, e.g., (seed, rank,
    batch, slot), without the collisions of ``seed + rank`` style sums."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])
