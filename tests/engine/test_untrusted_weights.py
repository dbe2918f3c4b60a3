"""Weights and config files that carry code, or NaN weights, are refused with the file named.

Each payload would create a folder (``os.mkdir``): the tests check the error and that the folder
does not exist, i.e. the payload did not run.
"""
import os
import pickle

import pytest
import torch
from torch import nn

from diffusiondet.config import build_config
from diffusiondet.engine import CheckpointError, DiffusionDetCheckpointer, load_model_weights
from tests.utils import tiny_cfg

CONFIG = "configs/diffdet.synthetic.res18.yaml"


class _Payload:
    """Unpickles as ``os.mkdir(path)``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)


def _numpy_state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_model_zoo_pickles_of_numpy_arrays_load(tmp_path):
    # Both formats of detectron2's .pkl branch: detectron2 zoo ("model" + "__author__") and
    # Caffe2 / Detectron1 ("blobs", with *_momentum entries dropped).
    source, target = _Toy(), _Toy()
    zoo = tmp_path / "zoo.pkl"
    zoo.write_bytes(pickle.dumps({"model": _numpy_state(source), "__author__": "d2"}))
    DiffusionDetCheckpointer(target).load(str(zoo))
    assert torch.equal(target.layer.weight, source.layer.weight)
    caffe2 = tmp_path / "caffe2.pkl"
    blobs = {**_numpy_state(source), "layer.weight_momentum": source.layer.weight.detach().numpy()}
    caffe2.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    DiffusionDetCheckpointer(_Toy()).load(str(caffe2))


def test_pickle_payload_in_a_pkl_is_refused_and_does_not_run(tmp_path):
    marker = str(tmp_path / "payload_ran")
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _numpy_state(_Toy()), "__author__": "x", "x": _Payload(marker)}))
    with pytest.raises(CheckpointError, match=r"evil\.pkl.*contains code.*posix\.mkdir"):
        DiffusionDetCheckpointer(_Toy()).load(str(path))
    assert not os.path.exists(marker)


def test_pickle_payload_in_a_pth_says_contains_code_not_corrupt(tmp_path):
    marker = str(tmp_path / "payload_ran")
    path = tmp_path / "evil.pth"
    torch.save({"model": _Toy().state_dict(), "x": _Payload(marker)}, str(path))
    with pytest.raises(CheckpointError, match=r"evil\.pth is not a plain checkpoint \(contains code\).*mkdir"):
        DiffusionDetCheckpointer(_Toy()).load(str(path))
    assert not os.path.exists(marker)


def test_trust_weights_loads_a_file_with_code(tmp_path):
    # MODEL.TRUST_WEIGHTS is the opt-in: the same file loads (and its code runs).
    marker = str(tmp_path / "payload_ran")
    path = tmp_path / "trusted.pkl"
    path.write_bytes(pickle.dumps({"model": _numpy_state(_Toy()), "__author__": "x", "x": _Payload(marker)}))
    cfg = tiny_cfg("MODEL.TRUST_WEIGHTS", True)
    DiffusionDetCheckpointer(_Toy(), trust_code=cfg.MODEL.TRUST_WEIGHTS).load(str(path))
    assert os.path.isdir(marker)


def test_non_finite_weights_are_an_error_naming_file_and_tensor(tmp_path):
    state = _Toy().state_dict()
    state["layer.weight"][0, 1] = float("inf")
    path = tmp_path / "flipped.pth"
    torch.save({"model": state}, str(path))
    with pytest.raises(CheckpointError, match=r"flipped\.pth has 1 non-finite.*layer\.weight \(1\)"):
        DiffusionDetCheckpointer(_Toy()).load(str(path))


def test_inference_without_weights_is_an_error():
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS is empty"):
        load_model_weights(_Toy(), tiny_cfg())


def test_yaml_python_tag_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSIONDET_TRUST_CONFIG", raising=False)
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f'_BASE_: "{os.path.abspath(CONFIG)}"\nSEED: !!python/object/apply:os.mkdir ["{marker}"]\n'
    )
    with pytest.raises(ValueError, match=r"evil\.yaml.*run code.*DIFFUSIONDET_TRUST_CONFIG"):
        build_config(str(path))
    assert not marker.exists()
    # The opt-in: the payload runs (SEED becomes os.mkdir's None, which yacs lets through).
    build_config(str(path), trust_config=True)
    assert marker.is_dir()
