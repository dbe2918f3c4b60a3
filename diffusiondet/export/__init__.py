"""Export of the whole detector to ONNX (torch's exporter) and its onnxruntime predictor.

* :class:`ExportableDetector`: inference (SAMPLING_MODE "graph", S steps unrolled, class NMS, the
  cap) as one module with fixed shapes; :func:`export_onnx` writes it to a file;
* :class:`OnnxPredictor`: runs the file with onnxruntime and answers like the PyTorch model.

onnx, onnxscript and onnxruntime are optional (``pip install -e .[export]``): nothing here imports
them before a function needs them. docs/deploy.md describes the graph, its modes and limits.
"""
from .exportable import (
    NOISE_MODES,
    OUTPUT_NAMES,
    ExportableDetector,
    canvas_size,
    class_nms_keep,
    noise_draws,
    sampling_noise,
)
from .onnx_export import EXPORT_EXTRA, export_onnx, import_optional
from .onnx_predictor import OnnxPredictor

__all__ = [
    "EXPORT_EXTRA",
    "NOISE_MODES",
    "OUTPUT_NAMES",
    "ExportableDetector",
    "OnnxPredictor",
    "canvas_size",
    "class_nms_keep",
    "export_onnx",
    "import_optional",
    "noise_draws",
    "sampling_noise",
]
