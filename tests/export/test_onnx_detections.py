"""The exported detector (diffusiondet.export) run by onnxruntime gives the PyTorch model's
detections: same images, same noise (seeded per image id), tiny random model.

Two images of different non-square sizes share a batch on a 64 x 96 canvas, which is also the
size eager inference pads that batch to (the backbone's GroupNorm sees the same padding), and
their outputs are rescaled to other sizes, as detectron2's evaluation asks.
"""
import onnx
import onnxruntime
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou

from diffusiondet.export import ExportableDetector, OnnxPredictor, class_nms_keep, export_onnx
from diffusiondet.export.onnx_export import _nms_translation
from diffusiondet.modeling.graph_sampler import batched_class_nms
from diffusioninst.export import ExportableDiffusionInst, OnnxInstPredictor
from tests.utils import random_input, tiny_cfg

CANVAS = (64, 96)
# Scores are float32 sigmoids (ONNX and ATen kernels differ in rounding); boxes go through four
# stages of an untrained head, which amplify rounding: measured 5e-7 and 5e-5 px.
SCORE_ATOL, BOX_ATOL = 1e-5, 1e-3


def inputs():
    images = [random_input(64, 80, seed=0), random_input(48, 96, seed=1)]
    images[0].update(height=128, width=150, image_id=3)  # rescaled 2x by detector_postprocess
    images[1].update(image_id=11)
    for x in images:
        x.pop("instances")
    return images


def tiny_model(*opts, config_file="configs/diffdet.synthetic.res18.yaml"):
    cfg = tiny_cfg("MODEL.DiffusionDet.SAMPLING_MODE", "graph", "SEED", 7, *opts, config_file=config_file)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # Small box refinements, as in a trained model: an untrained head grows boxes to several
    # times the image and amplifies rounding ~20x per stage.
    with torch.no_grad():
        for stage in model.head.head_series:
            stage.bboxes_delta.weight.mul_(0.05)
            stage.bboxes_delta.bias.zero_()
    return model


def assert_same_detections(got, want):
    for a, b in zip(got, want):
        a, b = a["instances"], b["instances"]
        assert a.image_size == b.image_size
        assert len(a) == len(b) > 0
        order_a, order_b = torch.argsort(a.scores), torch.argsort(b.scores)
        assert torch.equal(a.pred_classes[order_a], b.pred_classes[order_b])
        torch.testing.assert_close(a.scores[order_a], b.scores[order_b], rtol=0, atol=SCORE_ATOL)
        torch.testing.assert_close(
            a.pred_boxes.tensor[order_a], b.pred_boxes.tensor[order_b], rtol=1e-5, atol=BOX_ATOL
        )
        if b.has("pred_masks"):
            assert (a.pred_masks[order_a] != b.pred_masks[order_b]).float().mean() < 1e-3


@pytest.mark.parametrize(
    "opts",
    [
        ("MODEL.DiffusionDet.SAMPLE_STEP", 1),
        # "all_steps": with the official ensemble, 2 steps give the first call's detections alone;
        # here both calls count, so the DDIM step and the renewal draws matter. And a cap.
        ("MODEL.DiffusionDet.SAMPLE_STEP", 2, "MODEL.DiffusionDet.ENSEMBLE", "all_steps",
         "MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", 12),
        # The COCO configs' backbone: frozen BatchNorm, folded into the convolutions at inference.
        ("MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.FPN.NORM", ""),
    ],
    ids=["1_step", "2_steps_all_ensembled_cap_12", "1_step_frozen_bn_folded"],
)  # fmt: skip
def test_onnx_detections_equal_eager_graph_mode(tmp_path, opts):
    model = tiny_model(*opts)
    path = str(tmp_path / "model.onnx")
    export_onnx(ExportableDetector(model, 2, *CANVAS, noise="input"), path)
    got = OnnxPredictor(path, threads=1)(inputs())
    with torch.no_grad():
        want = model(inputs())
    assert_same_detections(got, want)
    cap = model.sampler.detections_per_image
    if cap:  # the cap is what limits these detections (before detector_postprocess drops empty boxes)
        with torch.no_grad():
            assert {len(r["instances"]) for r in model.inference(inputs(), do_postprocess=False)} == {cap}


def test_onnx_masks_equal_eager_diffusioninst(tmp_path):
    model = tiny_model(
        "MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", 10, config_file="configs/diffinst.synthetic.res18.yaml"
    )
    path = str(tmp_path / "inst.onnx")
    export_onnx(ExportableDiffusionInst(model, 2, *CANVAS), path)
    got = OnnxInstPredictor(path, threads=1)(inputs())
    with torch.no_grad():
        want = model(inputs())
    assert all(r["instances"].pred_masks.any() for r in want)  # masks to compare
    assert_same_detections(got, want)


def test_internal_noise_draws_in_the_graph_and_selects_like_the_sampler(tmp_path):
    model = tiny_model("MODEL.DiffusionDet.SAMPLE_STEP", 2)
    path = str(tmp_path / "internal.onnx")
    module = ExportableDetector(model, 2, *CANVAS, noise="internal")
    export_onnx(module, path)
    graph = onnx.load(path)
    assert [i.name for i in graph.graph.input] == ["images", "image_sizes"]
    assert {n.op_type for n in graph.graph.node} & {"RandomNormal", "RandomNormalLike"}
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    images, sizes = (t.numpy() for t in module.example_inputs())
    sizes[1] = (48, 96)
    first, second = (session.run(None, {"images": images, "image_sizes": sizes}) for _ in range(2))
    assert not (first[0] == second[0]).all()  # fresh noise at every run
    boxes, scores, classes, counts = (torch.from_numpy(v) for v in first)
    for b in range(2):
        n = int(counts[b])
        assert 0 < n < scores.shape[1]  # NMS suppressed some candidates
        assert torch.all(scores[b, :n][:-1] >= scores[b, :n][1:])
        assert not scores[b, n:].any() and not boxes[b, n:].any() and (classes[b, n:] == -1).all()
        # No two kept boxes of one class overlap beyond the NMS threshold.
        iou = pairwise_iou(Boxes(boxes[b, :n]), Boxes(boxes[b, :n]))
        same = classes[b, :n, None] == classes[b, None, :n]
        assert not ((iou > model.sampler.nms_threshold) & same).fill_diagonal_(False).any()


class NmsOnly(torch.nn.Module):
    def forward(self, boxes, scores, classes):
        return class_nms_keep(boxes, scores, classes, 3, 0.5)


def test_class_nms_translation_keeps_what_batched_class_nms_keeps(tmp_path):
    # Clusters of jittered copies of a few boxes, three classes, two images: suppression inside
    # a class, survival across classes and across images.
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(2, 4, 1, 2, generator=g) * 80
    xy = (centers + torch.randn(2, 4, 8, 2, generator=g) * 3).flatten(1, 2)  # (2, 32, 2)
    boxes = torch.cat([xy, xy + 20 + torch.rand(2, 32, 2, generator=g) * 5], dim=-1)
    scores = torch.rand(2, 32, generator=g)
    classes = torch.randint(0, 3, (2, 32), generator=g)
    keep, _ = batched_class_nms(boxes, scores, classes, 0.5)
    want = torch.zeros(64, dtype=torch.bool)
    want[keep] = True
    assert 10 < int(want.sum()) < 54  # a case where NMS decides something
    path = str(tmp_path / "nms.onnx")
    program = torch.onnx.export(
        NmsOnly(), (boxes, scores, classes), dynamo=True, verbose=False,
        custom_translation_table={torch.ops.diffusiondet.class_nms_keep.default: _nms_translation()},
    )  # fmt: skip
    program.save(path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (boxes.numpy(), scores.numpy(), classes.numpy()))))
    assert torch.equal(torch.from_numpy(got).flatten(), want)
    assert torch.equal(NmsOnly()(boxes, scores, classes).flatten(), want)  # the eager operator


def test_exportable_detector_refuses_what_it_cannot_capture():
    with pytest.raises(ValueError, match="SAMPLING_MODE 'graph'"):
        ExportableDetector(build_model(tiny_cfg()).eval(), 1, *CANVAS)
    model = tiny_model()
    with pytest.raises(ValueError, match="padded size"):
        ExportableDetector(model, 1, 64, 90)  # not a multiple of the FPN's 32
    with pytest.raises(ValueError, match="noise"):
        ExportableDetector(model, 1, *CANVAS, noise="none")
