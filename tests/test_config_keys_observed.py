"""Every config key the project adds is observed through behaviour, not through attributes.

The rows live in ``test_config_keys_observed_model.py`` (head, sampler, inference),
``test_config_keys_observed_training.py`` (corruption, matcher, losses) and
``test_config_keys_observed_other.py`` (``MODEL.DiffusionInst``, the optimizer and backbone keys,
and the table of keys whose observation is another test's). A row sets ONE key
through the config (``tests.utils.tiny_cfg``, then ``build_model`` or the builders of
``diffusiondet/modeling/builders.py``, never by editing a built model), runs the component with
fixed seeds on non-square inputs and returns something comparable: detections, losses, matches,
random draws, call counts, parameter and output shapes. ``expect`` is a list (one expected
observation per value), ``DIFFER`` (all observations pairwise different), ``SAME`` (all equal,
for observations normalised by the value) or a function ``(values, observations)`` that asserts.
A config that fails validation is observed as the exception's class name.

This file holds the shared harness and the completeness test: a key added by DiffusionDet's or
DiffusionInst's config (whatever its node) without a row or a referenced test fails here.
"""
import dataclasses
import math
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from diffusiondet.config_extensions import resolve_config_extensions
from diffusiondet.diffusion import TorchRandom
from tests.utils import random_input, tiny_cfg

DIFFER = "differ"
SAME = "same"
IMAGE_HW = (64, 96)  # non-square on purpose


@dataclasses.dataclass(frozen=True)
class Row:
    key: str  # under ``node``
    observed: str  # what is observed (also the test id)
    values: Sequence[Any]
    observe: Callable  # cfg -> comparable observation
    expect: Any  # list | DIFFER | SAME | callable(values, observations)
    base: Sequence[Any] = ()  # other opts held fixed for every value
    extra: Optional[Callable] = None  # value -> opts that must change with it
    known_bug: str = ""  # a real bug: the row is a strict xfail until it is fixed
    node: str = "MODEL.DiffusionDet"  # the config node of ``key``
    config_file: str = ""  # the YAML tiny_cfg starts from ("" = its default, DiffusionDet)

    @property
    def full_key(self) -> str:
        return f"{self.node}.{self.key}"

    def param(self):
        marks = [pytest.mark.xfail(strict=True, reason=self.known_bug)] if self.known_bug else []
        name = self.key if self.node == "MODEL.DiffusionDet" else self.full_key
        return pytest.param(self, id=f"{name}-{self.observed}", marks=marks)


def same(a, b) -> bool:
    """Equality of observations; tensors compare with a float tolerance."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
            return False
        return a.dtype == b.dtype and torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    if isinstance(a, float) or isinstance(b, float):
        numbers = isinstance(a, (int, float)) and isinstance(b, (int, float))
        return numbers and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def observe_row(row: Row) -> list:
    observations = []
    for value in row.values:
        opts = list(row.base) + [row.full_key, value]
        opts += list(row.extra(value)) if row.extra else []
        start = {"config_file": row.config_file} if row.config_file else {}
        try:
            cfg = tiny_cfg(*opts, **start)
        except ValueError as error:  # rejected at start-up by the config validation
            observations.append(type(error).__name__)
            continue
        torch.manual_seed(0)
        observations.append(row.observe(cfg))
    return observations


def check_row(row: Row) -> None:
    obs = observe_row(row)
    where = f"{row.full_key} = {list(row.values)} observed {row.observed}"
    if row.expect is DIFFER:
        for i in range(len(obs)):
            for j in range(i + 1, len(obs)):
                assert not same(obs[i], obs[j]), (
                    f"{where}: {row.values[i]!r} and {row.values[j]!r} gave the same {obs[i]}"
                )
    elif row.expect is SAME:
        for value, o in zip(row.values[1:], obs[1:]):
            assert same(o, obs[0]), f"{where}: {value!r} gave {o}, {row.values[0]!r} gave {obs[0]}"
    elif callable(row.expect):
        row.expect(row.values, obs)
    else:
        for value, o, e in zip(row.values, obs, row.expect, strict=True):
            assert same(o, e), f"{where}: {value!r} gave {o}, expected {e}"


def proportional(values, obs):
    """Observation / value is the same for every value (the value scales the observation)."""
    assert not same(obs[0], 0.0), "a zero observation cannot show a scale"
    ratios = [o / v for v, o in zip(values, obs)]
    assert all(same(r, ratios[0]) for r in ratios), f"values {values} gave {obs}: not proportional"


# ----------------------------------------------------------------------------- recording tools
class RecordingRandom(TorchRandom):
    """Seeded ``RandomSource`` that records every draw as (kind, shape) and its value.

    With ``later_seed`` every draw after the first comes from a second generator: the first
    draw (x_T at inference) stays, the later ones (DDIM noise, refills) change.
    """

    def __init__(self, seed: int = 0, later_seed: Optional[int] = None):
        super().__init__(generator=torch.Generator().manual_seed(seed))
        self.later = None if later_seed is None else torch.Generator().manual_seed(later_seed)
        self.draws, self.values, self.randint_highs = [], [], []

    def _record(self, kind, shape, value):
        self.draws.append((kind, tuple(int(s) for s in shape)))
        self.values.append(value)
        if self.later is not None:
            self.generator = self.later
        return value

    def randn(self, shape):
        return self._record("randn", shape, super().randn(shape))

    def rand(self, shape):
        return self._record("rand", shape, super().rand(shape))

    def randint(self, high, shape):
        self.randint_highs.append(high)
        return self._record("randint", shape, super().randint(high, shape))

    def randperm(self, n):
        return self._record("randperm", (n,), super().randperm(n))


class HeadCalls:
    """Records every call of a head module: its input boxes (B, N, 4), t (B,) and its outputs."""

    def __init__(self, head: torch.nn.Module):
        self.boxes, self.times, self.outputs = [], [], []
        head.register_forward_pre_hook(self._pre)
        head.register_forward_hook(self._post)

    def _pre(self, module, args):
        self.boxes.append(args[1].detach().clone())
        self.times.append(args[2].clone())

    def _post(self, module, args, output):
        self.outputs.append({k: v.detach() for k, v in output.items()})

    def __len__(self):
        return len(self.boxes)


def run_model(cfg, train: bool = False, rng: Optional[RecordingRandom] = None):
    """Build the model from ``cfg`` (seed 0) and run one training or inference pass on one image.

    Inference skips detector_postprocess, so detections are the sampler's output as is.
    Returns a namespace with ``out`` (loss dict or the image's Instances), ``calls``, ``rng``.
    """
    torch.manual_seed(0)
    model = build_model(cfg)
    calls = HeadCalls(model.head)
    rng = rng if rng is not None else RecordingRandom(0)
    inputs = [random_input(*IMAGE_HW, seed=0)]
    if train:
        out = model.train().forward_training(inputs, rng=rng)
    else:
        out = model.eval().inference(inputs, rng=rng, do_postprocess=False)[0]["instances"]
    return SimpleNamespace(out=out, calls=calls, rng=rng)


# ------------------------------------------------------------------------------ completeness
# The packages whose configs add keys; a new package with keys joins this list.
PROJECT_PACKAGES = ("diffusiondet", "diffusioninst", "diffusionengine")


def flat_keys(node: CfgNode, prefix: str = "") -> set:
    """Full names ("A.B.C") of the leaf keys of a config node."""
    keys = set()
    for name, value in node.items():
        if isinstance(value, CfgNode):
            keys |= flat_keys(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def project_keys() -> set:
    """Every key the project's config extensions add to detectron2's defaults, in any node."""
    cfg = get_cfg()
    for extension in resolve_config_extensions(PROJECT_PACKAGES):
        if extension.add_config is not None:
            extension.add_config(cfg)
    return flat_keys(cfg) - flat_keys(get_cfg())


def test_every_config_key_has_a_row():
    from tests.test_config_keys_observed_model import ROWS as model_rows
    from tests.test_config_keys_observed_other import OBSERVED_ELSEWHERE
    from tests.test_config_keys_observed_other import ROWS as other_rows
    from tests.test_config_keys_observed_training import ROWS as training_rows

    rows = model_rows + training_rows + other_rows
    keys = project_keys()
    observed = {row.full_key for row in rows} | set(OBSERVED_ELSEWHERE)
    assert keys - observed == set(), "config keys without an observation row or a referenced test"
    assert observed - keys == set(), "rows or references for keys that do not exist"
    ids = [r.param().id for r in rows]
    assert len(ids) == len(set(ids)), "duplicate row ids"
    # Sanity of the enumeration itself: keys of every kind the project adds are in it.
    assert {"MODEL.DiffusionDet.ALPHA", "MODEL.DiffusionInst.MASK_WEIGHT", "SOLVER.FUSED_ADAMW",
            "TEST.CLASS_MAPPING", "DATASETS.CUSTOM.TRAIN_JSON", "MODEL.SWIN.SIZE",
            "MODEL.TIMM.NAME", "INPUT.CROP.PRE_CROP_MIN_SIZES", "MODEL.DiffusionEngine.SD_PATH",
            "DATASETS.GENERATED.DIRS"} <= keys  # fmt: skip
