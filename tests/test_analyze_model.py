"""tools/analyze_model.py: parameters and FLOPs per component (diffusiondet/tooling/model_analysis.py,
diffusionengine/model_analysis.py).

The values are checked against counts made another way: the per-step head against the analytic
GEMM count of diffusiondet/tooling/roofline.py, the total against FlopCounterMode around a real
inference call (so backbone + calls × head + mask branch + M × mask head is what the model runs),
the backbone's scaling with the image size, the head's in N. Images are non-square.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from detectron2.modeling import build_backbone, build_model

from diffusiondet.tooling import roofline
from diffusiondet.tooling.model_analysis import (
    BACKBONE, HEAD, PER_DETECTION, PER_IMAGE, analyze_model, backbone_components, format_analysis,
)  # fmt: skip
from diffusionengine import build_config
from diffusionengine.model_analysis import analyze_config, sd_layout_components

from .conftest import diffusionengine_opts
from .test_every_config_runs import CONFIGS, _rel, tiny_config
from .utils import TINY_OPTS, random_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = "configs/diffdet.synthetic.res18.yaml"
INST = "configs/diffinst.synthetic.res18.yaml"
ENGINE = "configs/diffengine.synthetic.tinysd.yaml"


def _one(analysis, kind):
    (component,) = analysis.of_kind(kind)
    return component


def _tiny(path, sd_path, *opts):
    return build_config(path, TINY_OPTS + diffusionengine_opts(path, sd_path) + list(opts))


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_every_config_is_counted(path, tiny_sd_folder):
    """Every shipped YAML (tiny widths, its own family) gives positive finite counts that add up."""
    _, cfg = tiny_config(path, tiny_sd_folder)
    d = cfg.MODEL.DiffusionDet
    steps, boxes = 2, 7
    a = analyze_config(cfg, steps, boxes, (48, 80))
    for c in a.components:
        assert torch.isfinite(torch.tensor(c.flops)) and c.flops >= 0 and c.params >= 0 and c.calls >= 0, c
    assert all(c.flops > 0 and c.params > 0 and c.calls == 1 for c in a.of_kind(BACKBONE))
    head = _one(a, HEAD)
    assert head.flops > 0 and head.params > 0
    assert head.calls == steps - (d.SKIP_UNUSED_CALLS and d.ENSEMBLE == "official")
    is_inst = cfg.MODEL.META_ARCHITECTURE == "DiffusionInst"
    assert len(a.of_kind(PER_IMAGE)) == len(a.of_kind(PER_DETECTION)) == int(is_inst)
    expected = sum(c.flops for c in a.of_kind(BACKBONE)) + head.calls * head.flops
    if is_inst:
        mask, filters = _one(a, PER_IMAGE), _one(a, PER_DETECTION)
        assert mask.flops > 0 and mask.params > 0 and mask.calls == 1
        assert filters.flops > 0 and filters.calls == (d.DETECTIONS_PER_IMAGE or boxes)
        expected += mask.flops + filters.calls * filters.flops
    assert a.total_flops == expected > 0


@pytest.mark.parametrize("skip_unused_calls", [True, False], ids=["skip", "all_calls"])
@pytest.mark.parametrize("path", [DET, INST, ENGINE], ids=["det", "inst", "engine"])
def test_total_equals_the_count_of_a_real_inference(path, skip_unused_calls, tiny_sd_folder, monkeypatch):
    """FlopCounterMode around ``model(inputs)`` on CPU (3 steps, 12 boxes) counts exactly the
    analysis's total, with M the detections the call kept; parameters match the built model."""
    steps, boxes, (h, w) = 3, 12, (64, 96)
    cfg = _tiny(path, tiny_sd_folder, "MODEL.DiffusionDet.SKIP_UNUSED_CALLS", skip_unused_calls)
    cfg.merge_from_list(["MODEL.DiffusionDet.SAMPLE_STEP", steps, "MODEL.DiffusionDet.EVAL_NUM_PROPOSALS", boxes])
    model = build_model(cfg).eval()
    kept = []

    def recording_select(candidates, select=model.sampler.select_detections):
        det = select(candidates)
        kept.append(len(det["scores"]))
        return det

    monkeypatch.setattr(model.sampler, "select_detections", recording_select)
    real = roofline.count_flops(lambda: model([random_input(h, w, 0, seed=3)]))
    assert len(kept) == 1 and kept[0] > 0

    a = analyze_config(cfg, steps, boxes, (h, w), detections=kept[0])
    head = _one(a, HEAD)
    assert head.calls == (steps - 1 if skip_unused_calls else steps)
    assert a.total_flops == real
    want_params = sum(p.numel() for p in model.parameters())
    if path == ENGINE:  # the frozen SD, outside the module tree; the VAE decoder never runs
        sd = model.backbone.components
        vae = [p for n, p in sd.vae.named_parameters() if not n.startswith(("decoder.", "post_quant_conv."))]
        want_params += sum(p.numel() for m in (sd.unet, sd.text_encoder) for p in m.parameters())
        want_params += sum(p.numel() for p in vae)
    assert a.total_params == want_params


@pytest.mark.parametrize("path, opts, boxes, image_hw", [
    (DET, TINY_OPTS, 20, (64, 96)),
    (INST, TINY_OPTS, 20, (64, 96)),
    ("configs/diffdet.coco.res50.yaml", [], 100, (800, 1333)),
], ids=["tiny", "tiny_inst", "coco_r50"])  # fmt: skip
def test_head_step_equals_the_analytic_count(path, opts, boxes, image_hw):
    """The measured head of one step = roofline.head_flops, which counts the same GEMMs by hand
    (2·m·n·k each), so they agree to the last FLOP."""
    model = build_model(build_config(path, ["MODEL.DEVICE", "cpu", *opts]))
    a = analyze_model(model, 4, boxes, image_hw)
    analytic = roofline.head_flops(model.head, boxes)["total"]  # reads the widths only
    assert _one(a, HEAD).flops == analytic


def test_head_is_linear_in_the_boxes_plus_attention():
    """h(N) = α + β·N + γ·N²: γ = 4·D per stage (Q·Kᵀ and softmax·V within the image), α the
    time MLPs (one row whatever N), everything else (Linears, the dynamic bmm) linear in N."""
    cfg = _tiny(DET, "")
    counts = {}
    for n in (8, 16, 24):
        model = build_model(cfg)
        counts[n] = _one(analyze_model(model, 1, n, (64, 96)), HEAD).flops
    d, stages = cfg.MODEL.DiffusionDet.HIDDEN_DIM, cfg.MODEL.DiffusionDet.NUM_HEADS
    gamma = 4 * d * stages
    linear = {n: f - gamma * n * n for n, f in counts.items()}
    beta = (linear[16] - linear[8]) / 8
    assert linear[24] - linear[16] == linear[16] - linear[8] == 8 * beta > 0
    time_mlps = [m for name, m in model.head.named_modules()
                 if "time_mlp" in name and isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert len(time_mlps) == 2 + stages
    assert linear[8] - 8 * beta == sum(2 * m.in_features * m.out_features for m in time_mlps)


def test_resnet_backbone_flops_scale_with_the_pixels():
    """Every counted layer is a convolution whose output has (H/s)·(W/s) pixels: half the height
    halves the FLOPs, half of both quarters them (sizes that divide by the coarsest stride)."""
    cfg = build_config("configs/diffdet.coco.res50.yaml", ["MODEL.DEVICE", "cpu"])
    with torch.device("meta"):
        backbone = build_backbone(cfg)

    def flops(h, w):
        (component,), _ = backbone_components(backbone, torch.empty(1, 3, h, w, device="meta"))
        return component.flops

    full = flops(768, 1344)
    assert 200e9 < full < 400e9  # R-50-FPN at ~800×1333 is ~150 GMACs
    assert flops(384, 1344) * 2 == full and flops(768, 672) * 2 == full and flops(384, 672) * 4 == full


def test_an_sd_layout_without_weights_counts_as_the_sd_folder(tiny_sd_folder):
    """``sd_layout_components`` (meta, configs only: how docs/speed.md counts SD 2-base) gives the
    VAE encoder and U-Net that a DiffusionEngine config counts from the folder itself."""
    layouts = [json.load(open(os.path.join(tiny_sd_folder, part, "config.json"))) for part in ("unet", "vae")]
    image_hw = (72, 150)  # padded to 128×192, as the backbone pads it
    from_layout = sd_layout_components(image_hw, *layouts)
    from_folder = analyze_config(_tiny(ENGINE, tiny_sd_folder), 1, 5, image_hw).of_kind(BACKBONE)[:2]
    assert [(c.params, c.flops) for c in from_layout] == [(c.params, c.flops) for c in from_folder]
    assert all(c.flops > 0 for c in from_layout)


def test_the_tool_prints_the_table(tiny_sd_folder):
    """As a user runs it: the printed rows and total are the analysis's, and a DiffusionEngine
    config without SD_PATH says what is missing."""
    tiny = [str(v) for v in TINY_OPTS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "tools/analyze_model.py", "--config-file", INST, "--steps", "2", "--boxes", "9",
           "--image-size", "64", "96", "--detections", "5", *tiny]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = analyze_config(build_config(INST, TINY_OPTS), 2, 9, (64, 96), detections=5)
    assert format_analysis(a, f"## {INST}\n") in proc.stdout
    assert "| per-detection outputs (pred_mask_probs) | 0.00 |" in proc.stdout and "| 5 |" in proc.stdout

    cmd = [sys.executable, "tools/analyze_model.py", "--config-file", "configs/diffengine.coco.sd2.yaml"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "SD_PATH must name a local SD folder" in proc.stderr
