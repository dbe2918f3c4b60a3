"""tools/dev/compare_samplers.py (its logic: diffusiondet.tooling.compare_samplers): the calls ->
SAMPLE_STEP mapping matches the model, and the table; the sampler's own count of its calls (used
by the roofline) matches the calls it makes."""
import csv
import os

import pytest

from detectron2.modeling import build_model

from diffusiondet.tooling import compare_samplers as tool
from tests.test_config_keys_observed import run_model
from tests.utils import tiny_cfg


@pytest.mark.parametrize("calls", [1, 2, 3, 4])
def test_steps_for_calls_makes_that_many_model_calls(calls):
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLE_STEP", tool.steps_for_calls(calls))
    assert len(run_model(cfg).calls) == calls


def test_sampler_specs_parse_and_bad_ones_fail():
    name, opts = tool.parse_sampler("eta0=MODEL.DiffusionDet.SAMPLER_UPDATE:ddim,MODEL.DiffusionDet.DDIM_ETA:0.0")
    assert name == "eta0"
    assert opts == ["MODEL.DiffusionDet.SAMPLER_UPDATE", "ddim", "MODEL.DiffusionDet.DDIM_ETA", "0.0"]
    with pytest.raises(ValueError, match="NAME=KEY:VALUE"):
        tool.parse_sampler("no-overrides")
    with pytest.raises(ValueError, match="is not KEY:VALUE"):
        tool.parse_sampler("x=MODEL.DiffusionDet.DDIM_ETA")
    with pytest.raises(ValueError, match="calls must be >= 1"):
        tool.steps_for_calls(0)


def test_table_reads_each_samplers_sweep_by_call_count(tmp_path):
    # sweep.csv rows as tools/sweep.py writes them: steps, boxes, seed, metrics...
    data = {"a": {(1, 0): 10.0, (1, 1): 12.0, (3, 0): 20.0, (3, 1): 20.0},
            "b": {(1, 0): 11.0, (1, 1): 11.0, (3, 0): 30.0, (3, 1): 34.0}}  # fmt: skip
    for name, values in data.items():
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["steps", "boxes", "seed", "bbox/AP"])
            writer.writeheader()
            for (steps, seed), ap in values.items():
                writer.writerow({"steps": steps, "boxes": 300, "seed": seed, "bbox/AP": ap})
    table = tool.summarize(str(tmp_path), ["a", "b"], [1, 2], "bbox/AP").splitlines()
    assert table[0] == "| model calls | a | b |"
    assert table[2] == "| 1 | 11.00 ± 1.41 | 11.00 ± 0.00 |"
    assert table[3] == "| 2 | 20.00 ± 0.00 | 32.00 ± 2.83 |"  # 2 calls = SAMPLE_STEP 3


@pytest.mark.parametrize("ensemble, skip", [("official", True), ("official", False), ("all_steps", True)])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sampler_reports_the_calls_it_makes(ensemble, skip, steps):
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLE_STEP", steps, "MODEL.DiffusionDet.ENSEMBLE", ensemble,
                   "MODEL.DiffusionDet.SKIP_UNUSED_CALLS", skip)  # fmt: skip
    run = run_model(cfg)
    sampler = build_model(cfg).sampler
    assert sampler.model_calls() == sampler.model_calls(steps) == len(run.calls)
