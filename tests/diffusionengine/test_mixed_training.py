"""Generated images train next to the real ones: generate 8 with the data engine, register the
folder through DATASETS.GENERATED.DIRS, run 20 iterations of the tiny ResNet DiffusionDet."""
import json
import os

import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.engine import Trainer
from diffusionengine import build_config
from diffusionengine.data.generated import generated_dataset_name
from diffusionengine.generate_cli import main
from tests.diffusionengine.test_data_engine import BASE, adapter_opts
from tests.utils import TINY_OPTS

REAL = "mixed_training_real"


@pytest.fixture(scope="module")
def generated_folder(tiny_sd1_path, tmp_path_factory):
    """8 generated 64 x 128 images (empty ones kept) labelled by a tiny adapter with REAL's classes."""
    root = str(tmp_path_factory.mktemp("mixed"))
    json_file = generate_synthetic_crowd(root, split="train", num_images=6, image_size=(64, 88),
                                         min_objects=1, max_objects=5, seed=2)  # fmt: skip
    register_coco_json(REAL, json_file, os.path.join(root, "train"))
    opts = [*adapter_opts(tiny_sd1_path), "DATASETS.TRAIN", (REAL,)]
    cfg = build_config(BASE, opts)
    torch.manual_seed(0)
    weights = os.path.join(root, "adapter.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    out = os.path.join(root, "generated")
    argv = ["--config-file", BASE, "--weights", weights, "--out", out, "--num-images", "8", "--keep-empty",
            "--size", "64", "128", "--steps", "2", "--batch-size", "4", "--opts", *map(str, opts)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_twenty_mixed_iterations_sample_the_generated_set_with_finite_losses(generated_folder, tmp_path):
    with open(os.path.join(generated_folder, "annotations.json")) as f:
        assert len(json.load(f)["images"]) == 8
    cfg = build_config("configs/diffdet.synthetic.res18.yaml", TINY_OPTS + [
        "DATASETS.TRAIN", (REAL,), "DATASETS.TEST", (), "MODEL.DiffusionDet.NUM_CLASSES", 5,
        "DATASETS.GENERATED.DIRS", (generated_folder,), "DATASETS.GENERATED.REPEAT_FACTOR", 2.0,
        "SOLVER.MAX_ITER", 20, "SOLVER.CHECKPOINT_PERIOD", 100, "SEED", 3, "OUTPUT_DIR", str(tmp_path),
    ])  # fmt: skip
    assert cfg.DATASETS.TRAIN == (REAL, generated_dataset_name(0, generated_folder))
    assert cfg.DATALOADER.SAMPLER_TRAIN == "WeightedTrainingSampler"
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    seen, losses = [], []
    dataset = trainer.data_loader.dataset  # NUM_WORKERS 0: the mapper runs in this process
    mapper = dataset.mapper
    dataset.mapper = lambda record: seen.append(record["file_name"]) or mapper(record)
    trainer.loss_hook = lambda iteration, loss_dict: losses.append(sum(loss_dict.values()).item()) or loss_dict
    trainer.train()
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.nonfinite_steps == 0
    generated = [f for f in seen if f.startswith(generated_folder)]
    # Both sets are drawn; 8 generated x 2 against 6 real: about 16 / 22 of the draws.
    assert 0 < len(generated) < len(seen) and len(generated) / len(seen) > 0.5
