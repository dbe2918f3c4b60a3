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
