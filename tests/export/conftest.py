"""The export tests' shared tools/export_onnx.py run (session scope: both files use it)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.export.common import FEW_TAPS, FROZEN_BN, REPO, tiny_model
from tests.utils import TINY_OPTS

# The synthetic set's 5 classes (the tool evaluates on it), frozen BN as in the COCO configs.
TOOL_MODEL_OPTS = ("MODEL.DiffusionDet.NUM_CLASSES", 5, "SEED", 7, *FEW_TAPS, *FROZEN_BN)


@pytest.fixture(scope="session")
def tool_export(tmp_path_factory):
    """One run of tools/export_onnx.py as a user runs it: export, AP of both predictors, speeds.

    An export costs ~10 s, so its graph also serves test_onnx_detections' 1-step case: the model
    built here has the tool's config (--steps 1 --boxes 10 as overrides) and the checkpoint's
    weights. Returns model, result (the finished process), output (.onnx) and report (.json).
    """
    folder = tmp_path_factory.mktemp("export_tool")
    model = tiny_model(*TOOL_MODEL_OPTS, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", 10)
    weights, output = folder / "tiny.pth", folder / "tiny.onnx"
    torch.save({"model": model.state_dict()}, weights)
    # The tiny config resizes the 160 x 160 synthetic images to 64 x 64: the canvas eager pads
    # to (--image-size 60 60 is rounded up to the FPN's multiple of 32). The config says 2 steps
    # and 20 boxes, the command line 1 and 10: the graph's metadata shows which won.
    args = [
        "--config-file", "configs/diffdet.synthetic.res18.yaml", "--weights", weights,
        "--steps", 1, "--boxes", 10, "--image-size", 60, 60, "--batch", 2, "--output", output,
        "--evaluate", "onnx", "eager", "--max-images", 2, "--benchmark", "--repeats", 1,
        "--threads", 1, *TINY_OPTS, *TOOL_MODEL_OPTS, "MODEL.DiffusionDet.SAMPLE_STEP", 2,
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "tools/export_onnx.py", *map(str, args)], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return SimpleNamespace(model=model, result=result, output=output, report=folder / "tiny.json")
