"""Inference noise under SEED: each image draws from (SEED, image_id), so the same weights and
seed give the same detections whatever the batch, the image order or the global generator."""
import pytest
import torch

from diffusiondet.modeling import DiffusionDet  # noqa: F401  registers the meta-architecture
from detectron2.modeling import build_model
from tests.utils import random_input, tiny_cfg

# Batch vs alone within a tolerance on any kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


def _model(*opts):
    torch.manual_seed(0)  # the same random weights for every SEED
    return build_model(tiny_cfg("MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 12, *opts)).eval()


def _inputs():
    # Non-square images with ids, of one size: a batch of mixed sizes is padded to the largest,
    # which changes the backbone's features near the borders (not the noise).
    return [{**random_input(48, 72, seed=i), "image_id": 100 + i} for i in range(3)]


def _boxes(outputs):
    return [o["instances"].pred_boxes.tensor for o in outputs]


def test_detections_depend_on_seed_and_image_id_only():
    model, inputs = _model("SEED", 5), _inputs()
    torch.manual_seed(1)
    batch = _boxes(model(inputs))
    torch.manual_seed(2)  # another global state, other order, one image at a time
    alone = {x["image_id"]: _boxes(model([x]))[0] for x in reversed(inputs)}
    for x, boxes in zip(inputs, batch):
        torch.testing.assert_close(alone[x["image_id"]], boxes, atol=1e-3, rtol=0)
    other_seed = _boxes(_model("SEED", 6)(inputs))
    assert other_seed[0].shape != batch[0].shape or not torch.allclose(other_seed[0], batch[0])


def test_without_seed_or_image_id_the_global_generator_decides():
    seeded, unseeded = _model("SEED", 5), _model("SEED", -1)
    inputs = _inputs()
    assert len(seeded.image_noise_sources(inputs)) == 3
    assert unseeded.image_noise_sources(inputs) is None
    no_ids = [{k: v for k, v in x.items() if k != "image_id"} for x in inputs]
    assert seeded.image_noise_sources(no_ids) is None
    torch.manual_seed(3)
    first = _boxes(seeded(no_ids))
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, _boxes(seeded(no_ids))))
    torch.manual_seed(4)
    assert not all(torch.equal(a, b) for a, b in zip(first, _boxes(seeded(no_ids))))
