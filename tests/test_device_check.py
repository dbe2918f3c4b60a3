"""tools/dev/device_check.sh, and the device-capable tests it runs with DIFFDET_TEST_DEVICE=cuda.

The script's own tests run anywhere: without CUDA it must stop at once with its message; with a
stand-in interpreter (a shell script that only echoes) its steps, logs and exit codes are
checked on this CPU. The tests that take the ``device`` fixture run on the CPU in the normal
suite and on CUDA in the device check.
"""
import copy
import os
import signal
import stat
import subprocess
import time

import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.diffusion import TorchRandom
from diffusiondet.modeling.acceleration import set_head_speed_options
from tests.device import ENV_VAR, device, selected_device  # noqa: F401  (fixture)
from tests.utils import random_input, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "dev", "device_check.sh")


def _run_script(tmp_path, timeout=20, **env):
    """(exit code, stdout, stderr, seconds); the whole process group dies on timeout, so a script
    that wrongly went on to its GPU steps leaves nothing running."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), **env}
    proc = subprocess.Popen(["bash", SCRIPT], cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    start = time.perf_counter()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"device_check.sh still running after {timeout} s")
    return proc.returncode, out, err, time.perf_counter() - start


def test_script_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_without_cuda_the_script_fails_loudly_and_quickly(tmp_path):
    # An empty CUDA_VISIBLE_DEVICES hides any GPU, so this holds on a CUDA machine too.
    rc, out, err, seconds = _run_script(tmp_path, CUDA_VISIBLE_DEVICES="")
    # Quickly: _run_script fails the test if the script is still running after its timeout.
    assert rc != 0 and "device_check: no CUDA device" in err, (rc, out, err)
    assert "device_check: no CUDA device" in (tmp_path / "out" / "device_check.log").read_text()
    assert "== " not in out  # no step started


def _fake_python(tmp_path, fail_on=""):
    """An 'interpreter' that says CUDA is there, echoes its arguments, and exits 1 when they
    contain ``fail_on``."""
    path = tmp_path / "python"
    path.write_text(
        "#!/usr/bin/env bash\n"
        f'if [[ -n "{fail_on}" && "$*" == *"{fail_on}"* ]]; then echo "failing: $*"; exit 1; fi\n'
        'echo "ran: $*"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_steps_logs_and_exit_codes_with_a_stand_in_interpreter(tmp_path):
    rc, out, err, _ = _run_script(tmp_path, PYTHON=_fake_python(tmp_path))
    assert rc == 0, (out, err)
    log = (tmp_path / "out" / "device_check.log").read_text()
    for name in ("environment", "tests", "benchmark", "graph", "roofline", "compile"):
        assert f"== {name}: exit 0" in log
        assert (tmp_path / "out" / f"{name}.log").exists()
    assert "ran: -m pytest -q -p no:cacheprovider tests/test_device_check.py" in log
    bench = "tools/benchmark.py --device cuda --cases 1@300,4@500 --image-size 800"
    assert f"ran: {bench} --batches 1,8 --amp bf16 --tf32" in log
    # The graph sampling mode, eager and compiled (CUDA graphs), at batch 1 and 8.
    assert f"ran: tools/benchmark.py --graph --device cuda --cases 1@300,4@500 --image-size 800 --batches 1,8" in log
    assert "ran: tools/benchmark.py --roofline --device cuda" in log
    assert "ran: tools/benchmark.py --compile --device cuda" in log

    rc, out, err, _ = _run_script(tmp_path, PYTHON=_fake_python(tmp_path, fail_on="--compile"))
    assert rc == 1 and "FAILED: compile (exit 1)" in err, (out, err)
    # A spent budget skips the steps and fails: a check that ran nothing has not passed.
    rc, out, err, _ = _run_script(tmp_path, PYTHON=_fake_python(tmp_path), DEVICE_CHECK_BUDGET_S="0")
    assert rc == 1 and "tests (skipped)" in err and "ran: -m pytest" not in out


def test_a_requested_device_that_is_missing_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.fail.Exception, match="is_available"):
        selected_device()


# ---------------------------------------------------------------- device-capable tests
@pytest.fixture
def exact_fp32():
    """Plain fp32 on CUDA (TF32 off) so that tolerances mean the same on every device."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(device):
    torch.manual_seed(0)
    return build_model(tiny_cfg("MODEL.DEVICE", str(device))).eval()


def _head_inputs(device, batch=2, boxes=20):
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(batch, 32, 64 // s, 80 // s, generator=g).to(device) for s in (4, 8, 16, 32)]
    xy = torch.rand(batch, boxes, 2, generator=g) * 40
    xyxy = torch.cat([xy, xy + 4 + torch.rand(batch, boxes, 2, generator=g) * 30], -1).to(device)
    return features, xyxy, torch.tensor([999, 10], device=device)[:batch]


def test_head_on_device_matches_cpu(device, exact_fp32):  # noqa: F811
    model = _model(device)
    cpu_head = copy.deepcopy(model.head).cpu()
    with torch.no_grad():
        got = model.head(*_head_inputs(device))
        want = cpu_head(*_head_inputs("cpu"))
        # The speed option must not change results on this device either.
        set_head_speed_options(model.head, dynamic_chunk_size=7, pooler_threads=1)
        chunked = model.head(*_head_inputs(device))
    for key in ("pred_logits", "pred_boxes", "obj_features"):
        assert got[key].device.type == device.type
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(chunked[key], got[key], rtol=1e-4, atol=1e-3)


def test_inference_on_device_batch_equals_each_image_alone(device, exact_fp32):  # noqa: F811
    model = _model(device)
    model.sampler.steps = 3
    model.sampler.renewal_threshold = 0.2  # an untrained head: let renewal keep some boxes

    def infer(inputs, seeds):
        rngs = [TorchRandom(generator=torch.Generator().manual_seed(s)) for s in seeds]
        return [out["instances"] for out in model.inference(inputs, per_image_rng=rngs)]

    a, b = random_input(64, 80, seed=4), random_input(48, 96, seed=5)
    both = infer([a, b], [11, 12])
    alone = infer([a], [11]) + infer([b], [12])
    for x, y in zip(both, alone):
        assert x.pred_boxes.tensor.device.type == device.type
        assert len(x) == len(y) > 0 and torch.isfinite(x.pred_boxes.tensor).all()
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(x.scores, y.scores, atol=1e-5, rtol=1e-4)
        assert torch.equal(x.pred_classes, y.pred_classes)


def test_training_step_on_device(device):  # noqa: F811
    model = _model(device).train()
    losses = model([random_input(seed=1), random_input(seed=2, num_boxes=5)])
    total = sum(losses.values())
    assert total.device.type == device.type and torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
