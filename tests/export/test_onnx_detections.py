"""The exported detector (diffusiondet.export) run by onnxruntime gives the PyTorch model's
detections: same images, same noise (seeded per image id), tiny random models (tests.export.common).

Two images of different non-square sizes share a batch on a canvas that is also the size eager
inference pads that batch to (GroupNorm backbones see the same padding), and their outputs are
rescaled to other sizes, as detectron2's evaluation asks.
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
from tests.export.common import (
    ONE_STAGE,
    assert_same_detections,
    assert_tool_succeeded,
    eager,
    inputs,
    tiny_model,
)
from tests.utils import tiny_cfg

CANVAS = (64, 96)


def test_onnx_detections_equal_eager_1_step_frozen_bn_two_stages(tool_export):
    # The graph tools/export_onnx.py wrote (conftest): 1 step, 10 boxes, two head stages, the
    # COCO configs' folded frozen BN, a 64 x 64 canvas, the size eager pads these two images to.
    assert_tool_succeeded(tool_export)
    batch = inputs((64, 48), (40, 64))
    got = OnnxPredictor(str(tool_export.output), threads=1)(batch)
    assert_same_detections(got, eager(tool_export.model, batch))


def test_onnx_detections_and_masks_equal_eager_diffusioninst_2_steps_all_ensembled_cap(tmp_path):
    # "all_steps": with the official ensemble, 2 steps give the first call's detections alone;
    # here both calls count, so the DDIM step, the renewal draws and the noise order matter. And
    # a cap; DiffusionInst, whose masks (mask_probs in the graph) are pasted on the host.
    model = tiny_model(
        "MODEL.DiffusionDet.SAMPLE_STEP", 2, "MODEL.DiffusionDet.ENSEMBLE", "all_steps",
        "MODEL.DiffusionDet.DETECTIONS_PER_IMAGE", 12, *ONE_STAGE,
        config_file="configs/diffinst.synthetic.res18.yaml",
    )  # fmt: skip
    path = str(tmp_path / "inst.onnx")
    export_onnx(ExportableDiffusionInst(model, 2, *CANVAS), path)
    got = OnnxInstPredictor(path, threads=1)(inputs())
    want = eager(model, inputs())
    assert all(r["instances"].pred_masks.any() for r in want)  # masks to compare
    assert_same_detections(got, want)
    # The cap is what limits these detections (before detector_postprocess drops empty boxes).
    with torch.no_grad():
        assert {len(r["instances"]) for r in model.inference(inputs(), do_postprocess=False)} == {12}


def test_internal_noise_draws_in_the_graph_and_selects_like_the_sampler(tmp_path):
    # 2 steps: x_T and the DDIM / renewal draws come from RandomNormal (the official ensemble
    # skips the second head call, so the graph stays small). The noise is fresh at every run: with
    # 20 boxes about half the runs suppressed nothing in one image; with 100, none of 1000 eager
    # runs suppressed fewer than 9 per image.
    model = tiny_model(
        "MODEL.DiffusionDet.SAMPLE_STEP", 2, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 100, *ONE_STAGE
    )
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
