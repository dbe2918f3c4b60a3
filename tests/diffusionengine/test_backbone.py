"""StableDiffusionBackbone on the tiny SD: shapes, seeding, freezing, and the full DiffusionDet on it."""
import math
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone, build_model

from diffusiondet.engine import build_optimizer
from diffusionengine import build_config
from diffusionengine.local_sd import load_local_sd
from diffusionengine.modeling import StableDiffusionBackbone
from diffusionengine.modeling.backbone import image_seed
from diffusionengine.taps import UNetTaps
from tests.utils import random_input

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs", "Base-DiffusionEngine.yaml")
NAMES = {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
TINY_MODEL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.FPN.OUT_CHANNELS", 32,
    "MODEL.DiffusionDet.HIDDEN_DIM", 32,
    "MODEL.DiffusionDet.DIM_FEEDFORWARD", 64,
    "MODEL.DiffusionDet.NHEADS", 4,
    "MODEL.DiffusionDet.DIM_DYNAMIC", 8,
    "MODEL.DiffusionDet.NUM_HEADS", 2,
    "MODEL.DiffusionDet.NUM_CLASSES", 3,
    "MODEL.DiffusionDet.NUM_PROPOSALS", 10,
]  # fmt: skip


@pytest.fixture(scope="module")
def sd(tiny_sd1_path):
    return load_local_sd(tiny_sd1_path)


def backbone(sd, **kwargs):
    torch.manual_seed(0)
    return StableDiffusionBackbone(components=sd, **{"out_channels": 32, "seed": 7, **kwargs})


def images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) * 2 - 1 for h, w in sizes]


@pytest.mark.parametrize("hw", [(64, 64), (72, 104)])
def test_output_names_sizes_and_channels(sd, hw):
    bb = backbone(sd)
    h, w = hw
    out = bb(torch.stack(images(hw, hw)))
    assert bb.size_divisibility == 64
    assert {k: (s.channels, s.stride) for k, s in bb.output_shape().items()} == {k: (32, s) for k, s in NAMES.items()}
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, 32, math.ceil(h / s), math.ceil(w / s)) for k, s in NAMES.items()
    }
    assert all(torch.isfinite(v).all() for v in out.values())
    with pytest.raises(ValueError, match="multiple of the VAE factor 8"):
        bb(torch.zeros(2, 3, 70, 104))


def test_extra_levels_and_mapper_alone(sd):
    assert list(backbone(sd, extra_levels=0).output_shape()) == ["p3", "p4", "p5", "p6"]
    bb = backbone(sd, extra_levels=2)
    assert list(bb.output_shape()) == ["p3", "p4", "p5", "p6", "p7", "p8"]
    x = torch.stack(images((64, 96), (64, 96)))
    grouped = bb.diffusion_features(x)
    assert {s: g.shape[1] for s, g in grouped.items()} == {1: 96, 2: 96, 4: 128, 8: 192}
    direct, mapped = bb(x), bb.features_from_taps(grouped)
    assert all(torch.equal(direct[k], mapped[k]) for k in direct)
    # The data engine's route: taps recorded around its own U-Net call, then the mapper alone.
    with torch.no_grad(), UNetTaps(sd.unet) as taps:
        sd.unet(torch.randn(2, 4, 8, 12), 1, encoder_hidden_states=bb.prompt_embeds.expand(2, -1, -1))
    out = bb.features_from_taps(taps.grouped())
    assert out["p3"].shape == (2, 32, 8, 12) and out["p8"].shape == (2, 32, 1, 1)


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_same_image_same_features_in_any_batch_position(sd):
    bb = backbone(sd)
    a, b = images((64, 96), (64, 96), seed=1)
    ab, ba, aa = bb(torch.stack([a, b])), bb(torch.stack([b, a])), bb(torch.stack([a, a]))
    for k in ab:
        torch.testing.assert_close(ab[k][0], ba[k][1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(aa[k][0], aa[k][1], atol=1e-5, rtol=1e-4)
    # (p7 at 1x1 with one channel per GroupNorm group normalises to zeros: compare p3.)
    assert not torch.allclose(ab["p3"][0], ab["p3"][1], atol=1e-3)


def test_the_unet_sees_the_once_noised_latent_and_the_prompt(sd):
    # Eq. 4 of the paper: z_t = sqrt(a_t) E(x) + sqrt(1 - a_t) eps at t = TIMESTEP, one U-Net
    # call conditioned on the prompt; E(x) is the VAE's posterior sample x scaling_factor, and
    # both draws come from the image's own generator.
    bb = backbone(sd, timestep=3, prompt="a dog")
    x = torch.stack(images((64, 96), (64, 96), seed=5))
    calls = []
    hook = sd.unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    try:
        bb(x)
    finally:
        hook.remove()
    ((args, kwargs),) = calls
    with torch.no_grad():
        expected = []
        for image in x:
            g = torch.Generator().manual_seed(image_seed(7, image))
            z = sd.vae.encode(image[None]).latent_dist.sample(generator=g) * sd.vae.config.scaling_factor
            eps = torch.randn(z.shape, generator=g)
            a = sd.scheduler.alphas_cumprod[3]
            expected.append(a.sqrt() * z + (1 - a).sqrt() * eps)
        ids = sd.tokenizer("a dog", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        prompt = sd.text_encoder(ids)[0]
    torch.testing.assert_close(args[0], torch.cat(expected), atol=1e-5, rtol=1e-4)
    assert args[1].tolist() == [3, 3]
    torch.testing.assert_close(kwargs["encoder_hidden_states"], prompt.expand(2, -1, -1))


def test_seed_timestep_and_prompt_change_the_features(sd):
    x = torch.stack(images((64, 64), (64, 64), seed=2))
    ref = backbone(sd)(x)["p3"]
    assert torch.equal(backbone(sd)(x)["p3"], ref)  # seeded: the same again
    for kwargs in ({"seed": 8}, {"timestep": 500}, {"prompt": "a photo of a cat"}):
        assert not torch.allclose(backbone(sd, **kwargs)(x)["p3"], ref, atol=1e-4), kwargs
    # No seed: torch's global generator, so two calls differ.
    unseeded = backbone(sd, seed=-1)
    assert not torch.allclose(unseeded(x)["p3"], unseeded(x)["p3"], atol=1e-4)


def test_diffusion_model_is_frozen_outside_the_module_and_moves_with_it(sd):
    bb = backbone(sd)
    frozen = [p for m in sd.frozen_modules().values() for p in m.parameters()]
    ids = {id(p) for p in frozen}
    assert not any(id(p) in ids for p in bb.parameters())
    assert all(k.startswith(("lateral_convs.", "extra_convs.")) for k in bb.state_dict())
    assert not any(p.requires_grad for p in frozen)
    sd.unet.train()  # e.g. by someone else's code: the detector's train() puts it back
    bb.train()
    assert bb.lateral_convs.training and not any(m.training for m in sd.frozen_modules().values())
    bb.to("cpu")
    assert {p.device.type for p in frozen} == {"cpu"}
    bb.double()
    try:
        assert {p.dtype for p in frozen} == {torch.float64} and bb.prompt_embeds.dtype == torch.float64
        assert bb(torch.stack(images((64, 64), (64, 64))).double())["p4"].dtype == torch.float64
    finally:
        bb.float()
    assert {p.dtype for p in frozen} == {torch.float32}


@pytest.mark.parametrize(
    "key, values",
    [
        ("MODEL.DiffusionEngine.TIMESTEP", (1, 500)),
        ("MODEL.DiffusionEngine.PROMPT", ("", "a photo of a dog")),
        ("SEED", (1, 2)),
    ],
)
def test_config_keys_change_the_features(tiny_sd1_path, key, values):
    x = torch.stack(images((64, 96), (64, 96), seed=6))
    feats = []
    for value in values:
        cfg = build_config(BASE, ["MODEL.DiffusionEngine.SD_PATH", tiny_sd1_path, *TINY_MODEL, key, value])
        torch.manual_seed(0)  # the same mapper init: only the key differs
        feats.append(build_backbone(cfg)(x)["p3"])
    assert not torch.allclose(feats[0], feats[1], atol=1e-4), key


def test_config_keys_choose_the_model_and_the_levels(tiny_sd1_path, tiny_sd2_path):
    def build(*opts):
        cfg = build_config(BASE, [*TINY_MODEL, *opts])
        return build_backbone(cfg)

    sd1 = build("MODEL.DiffusionEngine.SD_PATH", tiny_sd1_path)
    sd2 = build("MODEL.DiffusionEngine.SD_PATH", tiny_sd2_path)
    assert sd1.components.path == tiny_sd1_path and not sd1.components.unet.config.use_linear_projection
    assert sd2.components.path == tiny_sd2_path and sd2.components.unet.config.use_linear_projection
    no_extra = build("MODEL.DiffusionEngine.SD_PATH", tiny_sd1_path, "MODEL.DiffusionEngine.EXTRA_LEVELS", 0)
    assert list(no_extra.output_shape()) == ["p3", "p4", "p5", "p6"] and list(sd1.output_shape())[-1] == "p7"


def _model(sd_path, *opts):
    cfg = build_config(BASE, ["MODEL.DiffusionEngine.SD_PATH", sd_path, *TINY_MODEL, *opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.mark.numerics  # same seed, same bits: also under another CPU's kernels
def test_diffusion_parameters_stay_out_of_optimizer_and_checkpoint(tiny_sd2_path, tmp_path):
    cfg, model = _model(tiny_sd2_path)
    sd = model.backbone.components
    frozen = {id(p) for m in sd.frozen_modules().values() for p in m.parameters()}
    assert frozen and not any(id(p) in frozen for p in model.parameters())
    in_optimizer = [p for g in build_optimizer(cfg, model).param_groups for p in g["params"]]
    assert not any(id(p) in frozen for p in in_optimizer)
    assert {id(p) for p in model.backbone.parameters()} <= {id(p) for p in in_optimizer}
    keys = list(model.state_dict())
    backbone_keys = [k for k in keys if k.startswith("backbone.")]
    assert backbone_keys and all(k.startswith(("backbone.lateral_convs.", "backbone.extra_convs.")) for k in backbone_keys)
    assert not any(part in k for k in keys for part in ("unet", "vae", "text_encoder", "prompt_embeds"))

    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    saved = torch.load(tmp_path / "model.pth", weights_only=True)["model"]
    assert set(saved) == set(keys)
    _, reloaded = _model(tiny_sd2_path, "SEED", cfg.SEED)
    torch.manual_seed(1)  # a different init of the trainable parts, then the checkpoint
    DetectionCheckpointer(reloaded).load(str(tmp_path / "model.pth"))
    inputs = [random_input(72, 104, 0, 3, seed=3), random_input(64, 80, 0, 3, seed=4)]
    for i, x in enumerate(inputs):
        x["image_id"] = i  # seeded sampling (SEED) per image
    with torch.no_grad():
        first = model.eval()(inputs)
        second = reloaded.eval()(inputs)
    for a, b in zip(first, second):
        a, b = a["instances"], b["instances"]
        assert len(a) > 0 and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_training_step_trains_the_mapper_only(tiny_sd1_path):
    _, model = _model(tiny_sd1_path)
    unet = model.backbone.components.unet
    batch = [random_input(72, 104, 3, 3, seed=1), random_input(48, 96, 2, 3, seed=2)]
    images_, _ = model.preprocess_image(batch)
    assert tuple(images_.tensor.shape[-2:]) == (128, 128)  # padded by the meta-arch to 64
    feats = model.extract_features(images_)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 128 // s, 128 // s) for s in (8, 16, 32, 64)]
    model.train()
    losses = model(batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    lateral = [p.grad for p in model.backbone.lateral_convs.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in lateral)
    # Boxes this small are pooled from p3 (detectron2's level assignment), so p3's mapper trains.
    assert all(p.grad.abs().sum() > 0 for p in model.backbone.lateral_convs[0].parameters())
    assert all(p.grad is None for p in unet.parameters()) and not unet.training


def test_backbone_multiplier_does_not_freeze_the_mapper(tiny_sd1_path):
    """The official recipes' SOLVER.BACKBONE_MULTIPLIER slows a pre-trained backbone; the SD
    backbone's trainable part is the new mapper, which must keep the base LR (even at 0)."""
    cfg, model = _model(tiny_sd1_path, "SOLVER.BACKBONE_MULTIPLIER", 0.0)
    mapper = {id(p) for p in model.backbone.parameters()}
    groups = build_optimizer(cfg, model).param_groups
    lrs = {g["lr"] for g in groups if any(id(p) in mapper for p in g["params"])}
    assert lrs == {cfg.SOLVER.BASE_LR}
