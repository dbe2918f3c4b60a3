"""The data engine on the tiny SD: labels from the generation's own last U-Net call (no extra call),
the timestep rule, seeded and resumable generation through tools/generate_dataset.py."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES, generate_synthetic_crowd
from diffusionengine import build_config
from diffusionengine.engine import DataEngine, TimestepMismatchError, generation_seed
from diffusionengine.generate_cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs", "Base-DiffusionEngine.yaml")
REAL = "data_engine_test_real"
SIZE = (64, 128)  # (h, w), non-square; multiples of the tiny backbone's 64
PROMPTS = ["a photo, with red circle in the realistic photo.", "a photo, with blue triangle in the realistic photo."]


def adapter_opts(sd_path, *extra):
    """A tiny DiffusionEngine adapter on the synthetic classes. Its detector is untrained (scores
    near the 0.01 prior), so every box above 0 is a label: the tests check plumbing, not quality."""
    return [
        "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.DiffusionDet.HIDDEN_DIM", 32,
        "MODEL.DiffusionDet.DIM_FEEDFORWARD", 64, "MODEL.DiffusionDet.NHEADS", 4,
        "MODEL.DiffusionDet.DIM_DYNAMIC", 8, "MODEL.DiffusionDet.NUM_HEADS", 2,
        "MODEL.DiffusionDet.NUM_CLASSES", 5, "MODEL.DiffusionDet.NUM_PROPOSALS", 10,
        "MODEL.DiffusionEngine.SD_PATH", sd_path, "MODEL.DiffusionEngine.LABEL_SCORE_THRESH", 0.0,
        "MODEL.DiffusionEngine.LABEL_MAX_PER_IMAGE", 4, "DATASETS.TRAIN", (REAL,), "DATASETS.TEST", (), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def adapter(tiny_sd1_path, tmp_path_factory):
    """(sd_path, weights file, real image folder) of a tiny adapter with seeded random weights."""
    root = str(tmp_path_factory.mktemp("data_engine"))
    json_file = generate_synthetic_crowd(root, split="train", num_images=4, image_size=(72, 96),
                                         min_objects=1, max_objects=3, seed=1)  # fmt: skip
    register_coco_json(REAL, json_file, os.path.join(root, "train"))
    cfg = build_config(BASE, adapter_opts(tiny_sd1_path))
    torch.manual_seed(0)
    weights = os.path.join(root, "adapter.pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return tiny_sd1_path, weights


@pytest.fixture(scope="module")
def engine(adapter):
    from diffusiondet.engine.checkpoint import load_model_weights

    cfg = build_config(BASE, adapter_opts(adapter[0]))
    model = build_model(cfg)
    load_model_weights(model, cfg, adapter[1])
    return DataEngine(cfg, model)


class _CountCalls:
    """Counts forward calls of a module (a pre-hook, removed on exit)."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_labelling_adds_no_unet_call_and_leaves_the_images_unchanged(engine, strength):
    seeds = [generation_seed(3, i) for i in range(2)]
    refs = [np.random.default_rng(i).integers(0, 256, (*SIZE, 3), dtype=np.uint8) for i in range(2)]
    unet = engine.backbone.components.unet
    with _CountCalls(unet) as engine_calls:
        out = engine.generate(PROMPTS, refs, seeds=seeds, strength=strength, steps=4, size=SIZE,
                              negative_prompt="blurry")  # fmt: skip
    # The same generation by a plain diffusers pipeline on the same components.
    pipe = engine.pipeline("ddim", img2img=strength < 1)
    args = dict(prompt=PROMPTS, num_inference_steps=4, guidance_scale=7.5, negative_prompt=["blurry"] * 2,
                generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np")  # fmt: skip
    if strength < 1:
        from PIL import Image

        args.update(image=[Image.fromarray(r) for r in refs], strength=strength)
    else:
        args.update(height=SIZE[0], width=SIZE[1])
    with _CountCalls(unet) as plain_calls, torch.no_grad():
        plain = (pipe(**args).images * 255).round().astype(np.uint8)
    assert engine_calls.calls == plain_calls.calls == (2 if strength < 1 else 4)
    for i, g in enumerate(out):
        np.testing.assert_array_equal(g.image, plain[i])
        assert g.image.shape == (*SIZE, 3) and g.t == 1 and g.seed == seeds[i]
        assert g.strength == strength and g.steps == 4 and g.scheduler == "ddim"
        assert 1 <= len(g.boxes) <= 4 and g.boxes.shape == (len(g.classes), 4)
        assert (g.boxes[:, 2] <= SIZE[1]).all() and (g.boxes[:, 3] <= SIZE[0]).all()
        assert set(g.classes.tolist()) <= set(range(5)) and (np.diff(g.scores) <= 0).all()
    assert not np.array_equal(out[0].image, out[1].image)


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_an_image_depends_on_its_seed_not_on_its_batch(engine):
    seeds = [generation_seed(5, i) for i in range(4)]
    together = engine.generate(PROMPTS * 2, seeds=seeds, steps=3, size=SIZE)
    swapped = engine.generate([PROMPTS[1], PROMPTS[0]], seeds=[seeds[3], seeds[2]], steps=3, size=SIZE)
    assert sum(len(g.boxes) for g in swapped) > 0  # labels are compared too
    for a, b in zip(together[2:], reversed(swapped)):
        # Equal up to the CPU kernels' batch-size-dependent rounding (bit-equal on this machine).
        np.testing.assert_allclose(a.image.astype(int), b.image.astype(int), atol=1)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        assert a.classes.tolist() == b.classes.tolist() and a.seed == b.seed


def test_a_last_step_off_the_adapter_timestep_is_an_error_unless_allowed(engine):
    with pytest.raises(TimestepMismatchError, match=r"t = 33.*TIMESTEP = 1"):
        engine.generate(PROMPTS, seeds=[1, 2], steps=30, scheduler="dpmsolver++", size=SIZE)
    out = engine.generate(PROMPTS, seeds=[1, 2], steps=30, scheduler="dpmsolver++", size=SIZE,
                          allow_timestep_mismatch=True)  # fmt: skip
    assert [g.t for g in out] == [33, 33] and out[0].scheduler == "dpmsolver++"
    assert engine.last_timestep("ddim", 7) == engine.last_timestep("ddim", 50) == 1


def test_bad_generation_arguments_are_errors(engine):
    with pytest.raises(ValueError, match="strength"):
        engine.generate(PROMPTS, [np.zeros((*SIZE, 3), np.uint8)] * 2, seeds=[1, 2], strength=0.0, size=SIZE)
    with pytest.raises(ValueError, match="runs no denoising step"):
        engine.generate(PROMPTS, [np.zeros((*SIZE, 3), np.uint8)] * 2, seeds=[1, 2], strength=0.1, steps=4, size=SIZE)
    with pytest.raises(ValueError, match="multiple of 64"):
        engine.generate(PROMPTS, seeds=[1, 2], size=(64, 100))


def test_label_classes_restrict_the_labels(adapter):
    cfg = build_config(BASE, adapter_opts(adapter[0], "MODEL.DiffusionEngine.LABEL_CLASSES", ("blue_triangle",)))
    torch.manual_seed(0)
    engine = DataEngine(cfg, build_model(cfg))
    assert engine.label_rules["allowed_classes"] == (SYNTHETIC_CROWD_CLASSES.index("blue_triangle"),)
    out = engine.generate(PROMPTS, seeds=[1, 2], steps=2, size=SIZE)
    assert {c for g in out for c in g.classes.tolist()} <= {2}


def _cli(adapter, out, *extra, opts=()):
    return main(["--config-file", BASE, "--weights", adapter[1], "--out", str(out), "--size", *map(str, SIZE),
                 "--steps", "3", "--batch-size", "2", "--seed", "7", *extra,
                 "--opts", *map(str, adapter_opts(adapter[0], *opts))])  # fmt: skip


def _files(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(folder) for f in names
    }  # fmt: skip


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_same_seed_same_bytes_and_resume_equals_one_shot(adapter, tmp_path):
    assert _cli(adapter, tmp_path / "a", "--num-images", "4") == 0
    assert _cli(adapter, tmp_path / "b", "--num-images", "4") == 0
    one_shot = _files(tmp_path / "a")
    assert sorted(one_shot) == ["annotations.json"] + [f"images/00000{i}.png" for i in range(1, 5)]
    assert _files(tmp_path / "b") == one_shot
    coco = json.loads(one_shot["annotations.json"])
    assert [im["seed"] for im in coco["images"]] == [generation_seed(7, i) for i in range(4)]
    assert coco["info"]["attempts"] == 4 and [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CROWD_CLASSES)
    assert all(im["prompt"].startswith("a photo, with ") and "elegant" in im["prompt"] for im in coco["images"])

    assert _cli(adapter, tmp_path / "c", "--num-images", "2") == 0
    with pytest.raises(FileExistsError, match="resume"):
        _cli(adapter, tmp_path / "c", "--num-images", "4")
    with pytest.raises(ValueError, match=r"other settings: \['guidance'\]"):
        _cli(adapter, tmp_path / "c", "--num-images", "4", "--resume", "--guidance", "2.0")
    assert _cli(adapter, tmp_path / "c", "--num-images", "4", "--resume") == 0
    assert _files(tmp_path / "c") == one_shot

    assert _cli(adapter, tmp_path / "d", "--num-images", "2", "--seed", "8") == 0
    assert _files(tmp_path / "d")["images/000001.png"] != one_shot["images/000001.png"]


def test_min_per_class_generates_past_n_and_max_images_stops_with_a_message(adapter, tmp_path, capsys):
    # The untrained adapter's classes are arbitrary: the bound is asked of the two allowed
    # classes (LABEL_CLASSES), which it must reach past N while the others get no label.
    allowed = ("red_circle", "magenta_cross")
    opts = ("MODEL.DiffusionEngine.LABEL_CLASSES", allowed)
    assert _cli(adapter, tmp_path / "a", "--num-images", "2", "--min-per-class", "6", opts=opts) == 0
    coco = json.loads(_files(tmp_path / "a")["annotations.json"])
    counts = {c["name"]: sum(a["category_id"] == c["id"] for a in coco["annotations"]) for c in coco["categories"]}
    assert min(counts[n] for n in allowed) >= 6 and len(coco["images"]) > 2
    assert sum(counts.values()) == sum(counts[n] for n in allowed)
    assert _cli(adapter, tmp_path / "b", "--num-images", "2", "--min-per-class", "1000", "--max-images", "4") == 1
    assert "stopped: --max-images 4" in capsys.readouterr().err
    assert len(json.loads(_files(tmp_path / "b")["annotations.json"])["images"]) == 4


def test_ref_dataset_runs_img2img_from_its_images(adapter, tmp_path):
    assert _cli(adapter, tmp_path / "r", "--num-images", "2", "--ref-dataset", REAL, "--strength", "0.5", "0.7") == 0
    images = json.loads(_files(tmp_path / "r")["annotations.json"])["images"]
    assert all(0.5 <= im["strength"] <= 0.7 and im["reference"].endswith(".png") for im in images)


def test_the_tool_help_imports_neither_diffusers_nor_transformers():
    # -X importtime lists every module imported, on stderr.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, "tools", "generate_dataset.py"), "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0 and "--min-per-class" in result.stdout, result.stderr[-2000:]
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "diffusionengine.generate_cli" in imported
    assert not [m for m in imported if m.split(".")[0] in ("diffusers", "transformers")]


@pytest.mark.parametrize(
    "key, value, fewer",
    [
        ("MODEL.DiffusionEngine.LABEL_SCORE_THRESH", 1.0, lambda base, n: n == 0),  # no score exceeds 1
        ("MODEL.DiffusionEngine.LABEL_MAX_PER_IMAGE", 1, lambda base, n: n == 1 < base),
        ("MODEL.DiffusionEngine.LABEL_MIN_SIZE", 1000.0, lambda base, n: n == 0),  # larger than the image
        ("MODEL.DiffusionEngine.LABEL_NMS_THRESH", 1.0, lambda base, n: n > base),  # no overlap suppresses
    ],
)
def test_label_keys_set_the_labelling_rules(adapter, key, value, fewer):
    """Each LABEL_* key reaches filter_labels: the same generation, labelled under the key's
    value, keeps the labels that rule allows (the default config here keeps 4 per image)."""

    def labels(*opts):
        cfg = build_config(BASE, adapter_opts(adapter[0], "MODEL.DiffusionEngine.LABEL_MAX_PER_IMAGE", 10, *opts))
        torch.manual_seed(0)
        out = DataEngine(cfg, build_model(cfg)).generate(PROMPTS[:1], seeds=[3], steps=2, size=SIZE)
        return len(out[0].classes)

    base = labels()
    assert base > 1
    assert fewer(base, labels(key, value)), (key, base)


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_the_generations_last_call_tap_equals_the_backbones_tap_on_its_latents_and_t(engine):
    """The labels of a generated image come from its last U-Net call under CFG (the conditional
    half); the adapter was trained on the backbone's own U-Net pass. On the latents and t that
    last call saw, with the generation's prompt, the backbone's pass gives the same taps, so the
    adapter sees in generation what it saw in training (up to the input's noise level)."""
    from diffusionengine.modeling.backbone import encode_prompt
    from diffusionengine.taps import UNetTaps

    backbone, prompt = engine.backbone, PROMPTS[1]
    pipe = engine.pipeline("ddim", img2img=False)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    with UNetTaps(backbone.components.unet, conditional_half=True) as taps, torch.no_grad():
        pipe(prompt=[prompt] * 2, num_inference_steps=3, guidance_scale=7.5, height=SIZE[0], width=SIZE[1],
             generator=generators, output_type="np")  # fmt: skip
        recorded = {s: x.clone() for s, x in taps.grouped().items()}
        latents, t = taps.latent.clone(), taps.timestep
    assert int(torch.as_tensor(t).flatten()[0]) == 1  # DDIM "leading" ends at the adapter's t
    context = encode_prompt(backbone.components, prompt).expand(2, -1, -1)
    again = backbone.tapped_unet(latents, torch.as_tensor(t).expand(2), context)
    assert sorted(again) == sorted(recorded)
    for s in recorded:
        torch.testing.assert_close(again[s], recorded[s], atol=1e-4, rtol=1e-4)
    mapped, mapped_again = backbone.features_from_taps(recorded), backbone.features_from_taps(again)
    for name in mapped:
        torch.testing.assert_close(mapped[name], mapped_again[name], atol=1e-4, rtol=1e-4)
    # Not vacuous: another prompt's context gives other taps.
    other = backbone.tapped_unet(latents, torch.as_tensor(t).expand(2), encode_prompt(backbone.components, "x").expand(2, -1, -1))
    assert not torch.allclose(other[1], recorded[1], atol=1e-4)
