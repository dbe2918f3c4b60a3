"""tools/export_onnx.py as a user runs it, and the export's optional dependencies: onnx,
onnxscript and onnxruntime are imported only when an export or a predictor needs them."""
import json
import math
import os
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from detectron2.modeling import build_model

from tests.utils import TINY_OPTS, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [*map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5"]  # the synthetic set's classes


def _python(code, **kwargs):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs,
    )  # fmt: skip


def test_importing_the_export_code_imports_no_onnx_package():
    result = _python(
        """
        import sys
        import diffusiondet.export, diffusioninst.export
        from diffusiondet.tooling import onnx_check
        optional = ("onnx", "onnxruntime", "onnxscript")
        loaded = [m for m in sys.modules if m.split(".")[0] in optional]
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr


def test_a_missing_onnxruntime_is_an_error_naming_the_extra(monkeypatch):
    from diffusiondet.export import OnnxPredictor
    from diffusiondet.export.onnx_export import export_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import` sees when not installed
    with pytest.raises(ImportError, match=r"'onnxruntime'.*pip install -e \.\[export\]"):
        OnnxPredictor("model.onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"'onnxscript'.*pip install -e \.\[export\]"):
        export_onnx(None, "model.onnx")


def test_export_tool_writes_the_graph_and_measures_ap_and_speed(tmp_path):
    # Random weights of the tiny synthetic model, saved as a checkpoint the tool loads.
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save({"model": build_model(tiny_cfg("MODEL.DiffusionDet.NUM_CLASSES", 5)).state_dict()}, weights)
    output = tmp_path / "tiny.onnx"
    # The tiny config resizes the 160 x 160 synthetic images to 64 x 64: the canvas eager pads to.
    args = [
        "--config-file", "configs/diffdet.synthetic.res18.yaml", "--weights", weights,
        "--steps", 1, "--boxes", 10, "--image-size", 60, 64, "--batch", 2, "--output", output,
        "--evaluate", "onnx", "eager", "--max-images", 2, "--benchmark", "--repeats", 1,
        "--threads", 1, *TINY,
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "tools/export_onnx.py", *map(str, args)], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    meta = {p.key: p.value for p in onnx.load(str(output)).metadata_props}
    # --image-size 60 is rounded up to the FPN's multiple of 32.
    assert {k: meta[k] for k in ("batch", "height", "width", "steps", "num_boxes", "noise")} == {
        "batch": "2", "height": "64", "width": "64", "steps": "1", "num_boxes": "10", "noise": "input"
    }  # fmt: skip
    with open(tmp_path / "tiny.json") as f:
        report = json.load(f)
    assert report["canvas"] == [64, 64] and report["threads"] == 1
    assert report["images_per_s_onnx"] > 0 and report["images_per_s_eager"] > 0
    # Same noise (seeded by image id), same canvas: the same AP, up to score ties.
    onnx_ap, eager_ap = report["AP_onnx"]["bbox"], report["AP_eager"]["bbox"]
    for key in ("AP", "AP50", "AP75"):
        assert math.isfinite(onnx_ap[key]) and abs(onnx_ap[key] - eager_ap[key]) < 1e-3, (onnx_ap, eager_ap)
