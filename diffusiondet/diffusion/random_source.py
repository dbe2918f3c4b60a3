"""Injectable sources of randomness for the diffusion corruption and the DDIM sampler.

Training corruption and inference sampling draw every random tensor through a ``RandomSource``
instead of calling the global RNG, so that a run recorded elsewhere (e.g. the official
implementation) can be replayed draw-for-draw with ``ReplayRandom``, and so that each image of a
batch can own its own stream (a batch then gives the same result as its images run alone).

Shapes are whatever the caller requests; this module has no shape conventions of its own.
"""
import zlib
from typing import Hashable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Shape = Union[Tuple[int, ...], torch.Size]


class RandomSource:
    """Interface: the four draws the diffusion code needs."""

    def randn(self, shape: Shape) -> Tensor:
        """Standard normal samples of the given shape (floating dtype)."""
        raise NotImplementedError

    def rand(self, shape: Shape) -> Tensor:
        """Uniform samples in [0, 1) of the given shape (floating dtype)."""
        raise NotImplementedError

    def randint(self, high: int, shape: Shape) -> Tensor:
        """Long tensor of the given shape with values uniform in {0, ..., high - 1}."""
        raise NotImplementedError

    def randperm(self, n: int) -> Tensor:
        """Long tensor (n,): a random permutation of 0..n-1."""
        raise NotImplementedError


class TorchRandom(RandomSource):
    """Draws from torch's RNG: the global one, or ``generator`` when given.

    Args:
        device: device of the returned tensors (and of ``generator``); None = CPU.
        dtype: floating dtype of ``randn`` / ``rand``.
        generator: optional ``torch.Generator`` living on ``device``.
    """

    def __init__(
        self,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        generator: Optional[torch.Generator] = None,
    ):
        self.device = device
        self.dtype = dtype
        self.generator = generator

    def randn(self, shape: Shape) -> Tensor:
        return torch.randn(
            tuple(shape), generator=self.generator, device=self.device, dtype=self.dtype
        )

    def rand(self, shape: Shape) -> Tensor:
        return torch.rand(
            tuple(shape), generator=self.generator, device=self.device, dtype=self.dtype
        )

    def randint(self, high: int, shape: Shape) -> Tensor:
        return torch.randint(
            high, tuple(shape), generator=self.generator, device=self.device, dtype=torch.long
        )

    def randperm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.generator, device=self.device, dtype=torch.long)


def seeded_source(seed: int, key: Hashable) -> TorchRandom:
    """A CPU ``TorchRandom`` whose stream is a function of (``seed``, ``key``) alone, e.g. the
    sampling noise of one image (key = its image id) whatever batch or order it comes in."""
    mixed = zlib.crc32(f"{seed}/{key}".encode())
    return TorchRandom(generator=torch.Generator().manual_seed(mixed))


class ReplayRandom(RandomSource):
    """Returns pre-recorded draws, in order, reshaped to the requested shape.

    The kind of draw is not checked unless the recording says it: entries may be plain tensors
    or ``(kind, tensor)`` pairs as stored in ``tests/fixtures/official_parity_v1.pt`` (kind in
    "randn", "randn_like", "rand", "randint", "randperm"); a pair whose kind does not match the
    requested method raises, which catches a changed call order early.

    Tensors are returned on their recorded device and dtype (``randint`` / ``randperm`` as long);
    callers cast to their working dtype and device.

    Args:
        draws: the recorded tensors (or ``(kind, tensor)`` pairs) in call order.
    """

    _KIND_ALIASES = {"randn": ("randn", "randn_like"), "rand": ("rand", "rand_like")}

    def __init__(self, draws: Sequence[Union[Tensor, Tuple[str, Tensor]]]):
        self._draws = list(draws)
        self._position = 0

    @property
    def remaining(self) -> int:
        """Number of recorded draws not consumed yet."""
        return len(self._draws) - self._position

    def _next(self, method: str, shape: Shape) -> Tensor:
        if self._position >= len(self._draws):
            raise RuntimeError(
                f"ReplayRandom ran out of draws: {method}{tuple(shape)} requested after all "
                f"{len(self._draws)} recorded draws were used"
            )
        entry = self._draws[self._position]
        if isinstance(entry, (tuple, list)):
            kind, tensor = entry
            if kind not in self._KIND_ALIASES.get(method, (method,)):
                raise RuntimeError(
                    f"ReplayRandom draw #{self._position} was recorded as {kind!r} but "
                    f"{method!r} was requested"
                )
        else:
            tensor = entry
        numel = 1
        for size in shape:
            numel *= int(size)
        if tensor.numel() != numel:
            raise RuntimeError(
                f"ReplayRandom draw #{self._position} has {tensor.numel()} elements "
                f"(shape {tuple(tensor.shape)}) but {method}{tuple(shape)} needs {numel}"
            )
        self._position += 1
        return tensor.reshape(tuple(shape))

    def randn(self, shape: Shape) -> Tensor:
        return self._next("randn", shape)

    def rand(self, shape: Shape) -> Tensor:
        return self._next("rand", shape)

    def randint(self, high: int, shape: Shape) -> Tensor:
        return self._next("randint", shape).long()

    def randperm(self, n: int) -> Tensor:
        return self._next("randperm", (n,)).long()
