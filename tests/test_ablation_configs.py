"""configs/ablations/: each file is the 300-box COCO R-50 base plus only its table's ablated keys.

The merged config of every ablation YAML is compared with the merged base config key by key
(both CfgNodes flattened to "A.B.C" -> value): the only differences are keys the file sets, the
file sets only keys its table ablates, and each file sets the values its name says.
"""
import glob
import os

import pytest
import yaml

from diffusioninst import build_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ABLATIONS = os.path.join(ROOT, "configs", "ablations")
BASE = os.path.join(ROOT, "configs", "diffdet.coco.res50.300boxes.yaml")
D = "MODEL.DiffusionDet."

# Table folder -> (paper table named in the first line, keys its files may set, file count).
TABLES = {
    "table4a_signal_scale": ("Table 4a", {D + "SNR_SCALE"}, 4),
    "table4b_gt_padding": ("Table 4b", {D + "PADDING"}, 4),
    "table4c_sampling": ("Table 4c", {D + "SAMPLER_UPDATE", D + "BOX_RENEWAL"}, 4),
    "table5_train_boxes": ("Table 5", {D + "NUM_PROPOSALS"}, 3),
    "table6_stages_steps": ("Table 6", {D + "NUM_HEADS", D + "SAMPLE_STEP", D + "ENSEMBLE"}, 3),
}

# Every ablation file -> the values it must set (keys without the MODEL.DiffusionDet. prefix).
EXPECTED = {
    "table4a_signal_scale/scale0.1.yaml": {"SNR_SCALE": 0.1},
    "table4a_signal_scale/scale1.0.yaml": {"SNR_SCALE": 1.0},
    "table4a_signal_scale/scale2.0.yaml": {"SNR_SCALE": 2.0},
    "table4a_signal_scale/scale3.0.yaml": {"SNR_SCALE": 3.0},
    "table4b_gt_padding/repeat.yaml": {"PADDING": "repeat"},
    "table4b_gt_padding/gaussian.yaml": {"PADDING": "gaussian_concat"},
    "table4b_gt_padding/uniform.yaml": {"PADDING": "uniform_concat"},
    "table4b_gt_padding/full_image.yaml": {"PADDING": "full_image_concat"},
    "table4c_sampling/ddim_on.renewal_on.yaml": {"SAMPLER_UPDATE": "ddim", "BOX_RENEWAL": True},
    "table4c_sampling/ddim_on.renewal_off.yaml": {"SAMPLER_UPDATE": "ddim", "BOX_RENEWAL": False},
    "table4c_sampling/ddim_off.renewal_on.yaml": {"SAMPLER_UPDATE": "x0", "BOX_RENEWAL": True},
    "table4c_sampling/ddim_off.renewal_off.yaml": {"SAMPLER_UPDATE": "x0", "BOX_RENEWAL": False},
    "table5_train_boxes/train100.yaml": {"NUM_PROPOSALS": 100},
    "table5_train_boxes/train300.yaml": {"NUM_PROPOSALS": 300},
    "table5_train_boxes/train500.yaml": {"NUM_PROPOSALS": 500},
    "table6_stages_steps/stages6.steps1.yaml": {"NUM_HEADS": 6, "SAMPLE_STEP": 1},
    "table6_stages_steps/stages6.steps2.yaml": {
        "NUM_HEADS": 6, "SAMPLE_STEP": 2, "ENSEMBLE": "all_steps"
    },
    "table6_stages_steps/stages12.steps1.yaml": {"NUM_HEADS": 12, "SAMPLE_STEP": 1},
}

FILES = sorted(glob.glob(os.path.join(ABLATIONS, "**", "*.yaml"), recursive=True))


def _rel(path):
    return os.path.relpath(path, ABLATIONS).replace(os.sep, "/")


def flatten(node, prefix=""):
    """Nested dict / CfgNode -> {"A.B.C": leaf value}; lists become tuples (YAML vs cfg)."""
    flat = {}
    for key, value in node.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


@pytest.fixture(scope="module")
def base_flat():
    return flatten(build_config(BASE))


def test_every_folder_has_its_files():
    folders = {_rel(os.path.dirname(p)) for p in FILES}
    assert folders == set(TABLES)
    for folder, (_, _, count) in TABLES.items():
        assert len(glob.glob(os.path.join(ABLATIONS, folder, "*.yaml"))) == count, folder
    assert sorted(_rel(p) for p in FILES) == sorted(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_ablation_differs_from_base_only_in_its_table_keys(path, base_flat):
    folder = _rel(os.path.dirname(path))
    table, allowed, _ = TABLES[folder]
    with open(path) as f:
        first_line = f.readline()
        f.seek(0)
        raw = yaml.safe_load(f)
    assert first_line.startswith("#") and table in first_line, first_line
    assert raw.pop("_BASE_") == "../../diffdet.coco.res50.300boxes.yaml"
    set_by_file = flatten(raw)
    assert set(set_by_file) <= allowed, f"{_rel(path)} sets keys outside {table}'s ablation"
    assert set_by_file == {D + k: v for k, v in EXPECTED[_rel(path)].items()}

    merged = flatten(build_config(path))
    assert set(merged) == set(base_flat)
    changed = {k for k in merged if merged[k] != base_flat[k]}
    # Exactly the set keys whose value is not the base's (a row equal to the base changes nothing).
    assert changed == {k for k, v in set_by_file.items() if v != base_flat[k]}
    for key, value in set_by_file.items():
        assert merged[key] == value and type(merged[key]) is type(base_flat[key]), key


def test_each_table_varies_its_ablated_keys(base_flat):
    # No two files of a table are the same experiment, and the base's own setting is one of
    # the rows of every table (it is the reference the paper marks).
    for folder in TABLES:
        rows = [EXPECTED[r] for r in EXPECTED if r.startswith(folder + "/")]
        assert len({tuple(sorted(r.items())) for r in rows}) == len(rows), folder
        assert any(all(base_flat[D + k] == v for k, v in r.items()) for r in rows), folder
