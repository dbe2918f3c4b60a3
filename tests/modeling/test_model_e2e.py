"""End-to-end checks of the DiffusionDet meta-architecture on CPU with a tiny configuration."""
import copy

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from diffusiondet.diffusion import TorchRandom
from tests.utils import random_input, tiny_cfg


# Float results depend on the CPU's kernels: re-run under the AVX2 one-thread settings.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def _with_boxes(inp, boxes, classes):
    inp = dict(inp)
    inst = Instances(inp["instances"].image_size)
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.long)
    inp["instances"] = inst
    return inp


def test_training_losses_finite_with_empty_and_degenerate_targets(model):
    model.train()
    empty = _with_boxes(random_input(seed=1), [], [])
    degenerate = _with_boxes(random_input(seed=2), [[10, 10, 10, 30], [5, 5, 40, 40], [70, 60, 70, 60]], [0, 1, 2])
    crowded = random_input(seed=3, num_boxes=35)  # more GT than the 20 proposals
    losses = model([empty, degenerate, crowded])
    assert len(losses) == 3 * 2  # (ce, bbox, giou) x 2 stages
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def _infer(model, inputs, seeds, **kw):
    model.eval()
    rngs = [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]
    return model.inference(inputs, per_image_rng=rngs, **kw)


@pytest.mark.parametrize("steps", [1, 3])
def test_batch_of_two_equals_each_image_alone(model, steps):
    model = copy.deepcopy(model)
    model.sampler.steps = steps
    model.sampler.renewal_threshold = 0.2  # with an untrained head, make renewal keep some boxes
    a, b = random_input(64, 80, seed=4), random_input(48, 96, seed=5)
    both = _infer(model, [a, b], [11, 12])
    alone = [_infer(model, [a], [11])[0], _infer(model, [b], [12])[0]]
    for x, y in zip(both, alone):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(x.pred_classes, y.pred_classes)


def test_eval_boxes_independent_of_training_and_rescaled(model):
    model = copy.deepcopy(model)
    model.eval()
    model.sampler.use_nms = False
    inp = random_input(64, 80, seed=6)
    inp["height"], inp["width"] = 128, 160  # original image twice the network input
    for n in (7, 50):
        model.eval_num_proposals = n
        out = model([inp])[0]["instances"]
        assert out.image_size == (128, 160)
        assert 0 < len(out) <= n
        boxes = out.pred_boxes.tensor
        assert (boxes[:, 0::2] <= 160).all() and (boxes[:, 1::2] <= 128).all() and (boxes >= 0).all()


def test_short_training_decreases_loss():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg)
    model.train()
    from diffusiondet.engine import build_optimizer

    opt = build_optimizer(cfg, model)
    batch = [random_input(seed=10, num_boxes=4), random_input(seed=11, num_boxes=6)]
    history = []
    for _ in range(40):
        loss = sum(model(batch).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:8]) / 8, sum(history[-8:]) / 8
    assert last < 0.8 * first, (first, last)
