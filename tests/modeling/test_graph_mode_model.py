"""SAMPLING_MODE "graph" on a whole (tiny) model: agreement with the parity mode where both must
agree, one compiled graph per (B, N), and DiffusionInst's masks through the same path.

Two images of different non-square sizes share a batch, each with its own noise generator.
"""
import pytest
import torch

from detectron2.modeling import build_model

from diffusiondet.diffusion import TorchRandom
from tests.utils import damp_box_refinements, random_input, tiny_cfg

pytestmark = pytest.mark.numerics

INPUTS = [random_input(64, 96, seed=0), random_input(80, 64, seed=1)]


def run(mode, *opts, model=None, config_file="configs/diffdet.synthetic.res18.yaml"):
    if model is None:
        cfg = tiny_cfg(
            "MODEL.DiffusionDet.SAMPLING_MODE", mode, "MODEL.DiffusionDet.SAMPLE_STEP", 3, *opts,
            config_file=config_file,
        )  # fmt: skip
        torch.manual_seed(0)
        model = damp_box_refinements(build_model(cfg).eval())
    rngs = [TorchRandom(generator=torch.Generator().manual_seed(b)) for b in range(len(INPUTS))]
    return model, model.inference(INPUTS, per_image_rng=rngs, do_postprocess=False)


def assert_same_detections(got, want, box_atol, box_rtol=2e-5):
    for a, b in zip(got, want):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        order_a, order_b = torch.argsort(a.scores), torch.argsort(b.scores)
        assert torch.equal(a.pred_classes[order_a], b.pred_classes[order_b])
        torch.testing.assert_close(a.scores[order_a], b.scores[order_b], rtol=0, atol=1e-5)
        # Relative too: an untrained head amplifies rounding in proportion to box size.
        torch.testing.assert_close(
            a.pred_boxes.tensor[order_a], b.pred_boxes.tensor[order_b], rtol=box_rtol, atol=box_atol
        )


def test_graph_mode_equals_parity_mode_when_every_box_is_kept():
    # Threshold 0 keeps every box, so both modes draw the same noise (see GraphBoxSampler).
    # What is left differs in rounding only: the fixed-shape pooler gathers its taps in another
    # order, and the NMS runs once over the batch. Measured: 1.5e-5 px, 1.0e-7 in score.
    keep_all = ["MODEL.DiffusionDet.RENEWAL_THRESHOLD", 0.0]
    _, parity = run("parity", *keep_all, "MODEL.DiffusionDet.FIXED_SHAPE_POOLING", False)
    _, graph = run("graph", *keep_all)
    assert_same_detections(graph, parity, box_atol=1e-3)


def test_graph_sampler_with_detectron2_pooling_is_exactly_the_parity_sampler():
    # The sampler alone (masked renewal, host-side ᾱ, shared time embedding, batched NMS) adds
    # no difference of its own when every box is kept: measured 0.
    keep_all = ["MODEL.DiffusionDet.RENEWAL_THRESHOLD", 0.0]
    _, parity = run("parity", *keep_all, "MODEL.DiffusionDet.FIXED_SHAPE_POOLING", False)
    model, _ = run("graph", *keep_all)
    model.head.use_fixed_shape_pooling = lambda enabled: None  # keep detectron2's pooler
    _, graph = run("graph", model=model)
    assert_same_detections(graph, parity, box_atol=1e-6, box_rtol=0)


def test_graph_mode_pools_with_fixed_shapes_only_while_sampling():
    model, _ = run("graph")
    calls = {"fixed": 0, "detectron2": 0}

    def count(name):
        return lambda module, args, out: calls.update({name: calls[name] + 1})

    model.head.fixed_shape_pooler.register_forward_hook(count("fixed"))
    model.head.box_pooler.register_forward_hook(count("detectron2"))
    stages = len(model.head.head_series)
    run("graph", model=model)
    # Every stage of every model call of the sampling loop pools with fixed shapes.
    assert calls == {"fixed": model.sampler.model_calls() * stages, "detectron2": 0}
    assert not model.head.fixed_shape_pooling  # switched off again when sampling ends
    # Outside sampling, a single model call and a training step pool with detectron2's pooler.
    calls.update(fixed=0, detectron2=0)
    _, _, features = model.inference_features(INPUTS)
    boxes = torch.tensor([[[8.0, 8.0, 40.0, 30.0]]] * len(INPUTS))
    with torch.no_grad():
        model.denoise(features, boxes, torch.tensor([500] * len(INPUTS)))
        model.train().forward_training(INPUTS)
    assert calls == {"fixed": 0, "detectron2": 2 * stages}


def test_compiled_step_is_one_graph_for_every_call_and_batch():
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model, eager = run("graph")
    model.sampler.compile_step, model.sampler.compile_backend = True, counting_backend
    _, compiled = run("graph", model=model)
    _, again = run("graph", model=model)  # new features and noise, same shapes: no recompile
    # fullgraph=True raises on any graph break; 2 calls x 2 batches were served by one graph.
    assert len(graphs) == 1
    assert_same_detections(compiled, eager, box_atol=1e-4)
    assert_same_detections(again, eager, box_atol=1e-4)


def test_aot_compiled_step_matches_eager_within_the_contract():
    # aot_eager traces through AOTAutograd (functionalised, decomposed ops) without generating
    # code: the CI-sized proof of what inductor compiles on GPUs (tools/benchmark.py --graph).
    model, eager = run("graph")
    model.sampler.compile_step, model.sampler.compile_backend = True, "aot_eager"
    _, compiled = run("graph", model=model)
    assert_same_detections(compiled, eager, box_atol=1e-3)


def test_diffusioninst_masks_in_graph_mode():
    keep_all = ["MODEL.DiffusionDet.RENEWAL_THRESHOLD", 0.0]
    config = "configs/diffinst.synthetic.res18.yaml"
    _, parity = run("parity", *keep_all, config_file=config)
    _, graph = run("graph", *keep_all, config_file=config)
    assert_same_detections(graph, parity, box_atol=1e-3)
    for a, b in zip(graph, parity):
        a, b = a["instances"], b["instances"]
        order_a, order_b = torch.argsort(a.scores), torch.argsort(b.scores)
        masks_a, masks_b = a.pred_masks[order_a], b.pred_masks[order_b]
        assert masks_a.shape == masks_b.shape and masks_a.shape[1:] == a.image_size
        # Binary masks of boxes equal within 1e-3 px: at most a few border pixels may flip.
        assert (masks_a != masks_b).float().mean() < 1e-3


def count_syncs(mode, steps):
    from diffusiondet.tooling.host_syncs import HostSyncCounter

    # Parity as it runs on a GPU: detectron2's pooler (FIXED_SHAPE_POOLING is for CPUs).
    model, _ = run(mode, "MODEL.DiffusionDet.FIXED_SHAPE_POOLING", False)
    model.sampler.steps = steps
    images, whwh, features = model.inference_features(INPUTS)
    with HostSyncCounter() as in_loop:
        model.head.use_fixed_shape_pooling(model.sampler.fixed_shape_pooling)
        model.sampler.sample_candidates(
            lambda boxes, t: model.denoise(features, boxes, t), model.alphas_cumprod, whwh, 20
        )
        model.head.use_fixed_shape_pooling(False)
    with HostSyncCounter() as whole:
        model.sample_detections(INPUTS, images, whwh, features)
    return in_loop, whole


def test_graph_mode_has_no_host_sync_inside_the_sampling_loop():
    parity_loop, parity_whole = count_syncs("parity", 4)
    # The counter sees the parity mode's syncs (unique, level split, renewal sizes) ...
    assert parity_loop.by_op["aten::nonzero"] > 0 and parity_loop.by_op["aten::_unique2"] > 0
    graph_loop, graph_4 = count_syncs("graph", 4)
    _, graph_8 = count_syncs("graph", 8)
    # ... and none in the graph mode's loop; after it, one NMS for the whole batch, whatever S.
    assert graph_loop.total == 0, dict(graph_loop.by_op)
    assert graph_4.by_op["torchvision::nms"] == 1 and graph_4.by_op == graph_8.by_op
    assert graph_4.total < parity_whole.total


def test_features_are_packed_once_per_batch_not_once_per_call():
    from diffusiondet.modeling.acceleration.fixed_shape_pooler import FixedShapeROIPooler

    model, first = run("graph")
    packs = []
    original = FixedShapeROIPooler.pack
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FixedShapeROIPooler, "pack", lambda self, f: packs.append(1) or original(self, f))
        _, again = run("graph", model=model)  # SAMPLE_STEP 3: 2 model calls
    assert len(packs) == 1
    assert_same_detections(again, first, box_atol=0, box_rtol=0)
    with pytest.raises(ValueError, match="use_fixed_shape_pooling"):
        model.head(model.head.fixed_shape_pooler.pack([torch.zeros(1, 32, 16, 24)] * 4),
                   torch.zeros(1, 3, 4), torch.tensor([5]))
