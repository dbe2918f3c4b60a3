"""Fixtures shared by the training tests."""
import os

import pytest

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """7 non-square synthetic images, some wider and some taller (both aspect groups)."""
    root = str(tmp_path_factory.mktemp("resume_data"))
    json_file = generate_synthetic_crowd(
        root, split="train", num_images=7, image_size=(64, 88), min_objects=2, max_objects=7, seed=5
    )
    image_root = os.path.join(root, "train")
    register_coco_json("resume_tiny_train", json_file, image_root)
    return json_file, image_root


@pytest.fixture(scope="session")
def straight_run(tiny_data, tmp_path_factory):
    """``weights(world)``: the final model state dict of the uninterrupted ``tools/train_net.py``
    run on ``tiny_data`` with ``world`` GLOO processes, trained once per session: the SIGKILL and
    SIGTERM resume tests compare against the same run (a 2-process job costs ~30 s)."""
    import torch

    from tests.engine.test_exact_resume import _job

    weights = {}

    def get(world):
        if world not in weights:
            root = tmp_path_factory.mktemp(f"straight_{world}")
            result = _job(root, tiny_data, "straight", world)
            assert result.returncode == 0, result.stderr[-2000:]
            path = root / "straight" / "model_final.pth"
            weights[world] = torch.load(path, map_location="cpu", weights_only=True)["model"]
        return weights[world]

    return get
