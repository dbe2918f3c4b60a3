"""Write an :class:`ExportableDetector` to an ONNX file with torch's exporter (``torch.onnx.export``,
``dynamo=True``: ``torch.export`` capture, then onnxscript's translation of every ATen operator).

The one operator torch's exporter does not know is the class-aware NMS
(:func:`~.exportable.class_nms_keep`): it is translated here, through the exporter's
``custom_translation_table``, into one ONNX ``NonMaxSuppression`` whose batch axis is the image and
whose class axis holds each class's scores (the candidates of other classes score -1, below the
score threshold). Same greedy NMS per (image, class) as the eager ``batched_class_nms``, with
float32 IoUs where the eager kernel works in float64.

onnx, onnxscript and onnxruntime are optional (``pip install -e .[export]``): imported here only
when a function needs them.
"""
import importlib
from typing import Dict

import torch

# Importing exportable registers torch.ops.diffusiondet.class_nms_keep.
from .exportable import ExportableDetector

__all__ = ["EXPORT_EXTRA", "export_onnx", "import_optional"]

EXPORT_EXTRA = "pip install -e .[export]"
OPSET = 18


def import_optional(name: str):
    """Import one of the export extra's packages, or raise an ImportError saying how to install."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"ONNX export and inference need {name!r}, which is not installed: {EXPORT_EXTRA}"
        ) from error


def _nms_translation():
    """The onnxscript function of ``class_nms_keep`` (built on demand: onnxscript is optional)."""
    onnx = import_optional("onnx")
    op = import_optional("onnxscript").opset18

    def translate(boxes, scores, classes, num_classes: int, iou_threshold: float):
        ids = onnx.helper.make_tensor("ids", onnx.TensorProto.INT64, [1, num_classes, 1], range(num_classes))
        member = op.Equal(op.Unsqueeze(classes, [1]), op.Constant(value=ids))  # (B, C, M)
        per_class = op.Where(member, op.Unsqueeze(scores, [1]), op.Constant(value_float=-1.0))
        selected = op.NonMaxSuppression(
            boxes,
            per_class,
            op.Constant(value_ints=[2**31 - 1]),  # keep every survivor
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[-0.5]),  # drops exactly the -1 rows of other classes
        )  # (R, 3): image, class, box
        index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (R, 2): image, box
        ones = op.Expand(op.Constant(value_float=1.0), op.Slice(op.Shape(index), [0], [1]))
        zeros = op.ConstantOfShape(op.Shape(scores))  # float 0 of (B, M)
        return op.Cast(op.ScatterND(zeros, index, ones), to=onnx.TensorProto.BOOL)

    return translate


def export_onnx(module: ExportableDetector, path: str, metadata: Dict[str, str] = ()) -> None:
    """Capture ``module`` and write ``path`` (ONNX opset 18), with the module's
    :meth:`~ExportableDetector.metadata` (and ``metadata``) as the model's metadata_props."""
    for name in ("onnx", "onnxscript"):
        import_optional(name)
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            module.example_inputs(),
            dynamo=True,
            opset_version=OPSET,
            input_names=module.input_names,
            output_names=module.output_names,
            custom_translation_table={torch.ops.diffusiondet.class_nms_keep.default: _nms_translation()},
            verbose=False,
        )
    program.model.metadata_props.update({**module.metadata(), **dict(metadata)})
    program.save(path)
