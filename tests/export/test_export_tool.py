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

from tests.export.common import REPO, assert_tool_succeeded


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


def test_export_tool_writes_the_graph_and_measures_ap_and_speed(tool_export):
    assert_tool_succeeded(tool_export)  # the run itself is conftest's tool_export
    meta = {p.key: p.value for p in onnx.load(str(tool_export.output)).metadata_props}
    # --image-size 60 60 is rounded up to the FPN's multiple of 32; --steps / --boxes override.
    assert {k: meta[k] for k in ("batch", "height", "width", "steps", "num_boxes", "noise")} == {
        "batch": "2", "height": "64", "width": "64", "steps": "1", "num_boxes": "10", "noise": "input"
    }  # fmt: skip
    with open(tool_export.report) as f:
        report = json.load(f)
    assert report["canvas"] == [64, 64] and report["threads"] == 1
    assert report["images_per_s_onnx"] > 0 and report["images_per_s_eager"] > 0
    # Same noise (seeded by image id), same canvas: the same AP, up to score ties.
    onnx_ap, eager_ap = report["AP_onnx"]["bbox"], report["AP_eager"]["bbox"]
    for key in ("AP", "AP50", "AP75"):
        assert math.isfinite(onnx_ap[key]) and abs(onnx_ap[key] - eager_ap[key]) < 1e-3, (onnx_ap, eager_ap)
