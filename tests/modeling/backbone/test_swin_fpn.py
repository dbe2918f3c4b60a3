"""Swin + FPN backbone: official names, checkpoint layout, ImageNet .pkl loading, sizes.

Expected keys and shapes are generated here from the official layout (not read from the model),
so a renamed module, a wrong size table entry or a missing norm shows up as a set difference.
"""
import os
import pickle
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.swin import SwinTransformer

from diffusiondet.backbone_config import SWIN_SIZES
from diffusiondet.engine import DiffusionDetCheckpointer
from diffusiondet.modeling.backbone.swin_fpn import (
    D2SwinTransformer,
    build_swin_backbone,
    convert_swin_classification_checkpoint,
)
from diffusioninst import build_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = os.path.join(REPO, "configs", "diffdet.coco.swinbase.yaml")
PREFIX = "backbone.bottom_up."


# A small head (one stage, 3 classes): the backbone and the FPN keep their official sizes.
TINY_HEAD = [
    "MODEL.DiffusionDet.NUM_PROPOSALS", 8, "MODEL.DiffusionDet.NUM_HEADS", 1, "MODEL.DiffusionDet.NUM_CLASSES", 3,
    "MODEL.DiffusionDet.DIM_FEEDFORWARD", 64, "MODEL.DiffusionDet.DIM_DYNAMIC", 8, "MODEL.DiffusionDet.SAMPLE_STEP", 1,
]  # fmt: skip


def swin_cfg(size="T", *opts, config=CONFIG):
    base = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.SWIN.SIZE", size]
    return build_config(config, base + TINY_HEAD + list(opts))


@pytest.fixture(autouse=True)
def fast_trunc_normal():
    """Swin's truncated-normal init is most of a model build on CPU (~3 s for Swin-T): these
    tests need random finite weights, not their exact distribution, so use a plain normal."""
    def fast(tensor, mean=0.0, std=1.0, *args, **kwargs):
        with torch.no_grad():
            return tensor.normal_(mean, std)

    with mock.patch.object(torch.nn.init, "trunc_normal_", fast):
        yield


@contextmanager
def no_weight_init():
    """Skip the random init of big models built only for their architecture (seconds -> ms);
    their weights are then uninitialised memory: compare shapes only."""
    keep = lambda t, *a, **k: t  # noqa: E731
    with mock.patch.multiple(torch.nn.init, trunc_normal_=keep, kaiming_uniform_=keep, uniform_=keep, constant_=keep):
        yield


def official_swin_shapes(size):
    """{name: shape} of the official detection Swin (bottom_up, no prefix), from the layout."""
    a = SWIN_SIZES[size]
    c0, w = a["embed_dim"], a["window_size"]
    shapes = {"patch_embed.proj.weight": (c0, 3, 4, 4), "patch_embed.proj.bias": (c0,)}
    shapes.update({f"patch_embed.norm.{p}": (c0,) for p in ("weight", "bias")})
    for s, (depth, heads) in enumerate(zip(a["depths"], a["num_heads"])):
        c = c0 * 2**s
        for b in range(depth):
            blk = f"layers.{s}.blocks.{b}."
            block = {
                "norm1.weight": (c,), "norm1.bias": (c,),
                "attn.relative_position_bias_table": ((2 * w - 1) ** 2, heads),
                "attn.relative_position_index": (w * w, w * w),
                "attn.qkv.weight": (3 * c, c), "attn.qkv.bias": (3 * c,),
                "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
                "norm2.weight": (c,), "norm2.bias": (c,),
                "mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,),
                "mlp.fc2.weight": (c, 4 * c), "mlp.fc2.bias": (c,),
            }  # fmt: skip
            shapes.update({blk + k: v for k, v in block.items()})
        if s < 3:
            shapes[f"layers.{s}.downsample.reduction.weight"] = (2 * c, 4 * c)
            shapes.update({f"layers.{s}.downsample.norm.{p}": (4 * c,) for p in ("weight", "bias")})
        shapes.update({f"norm{s}.{p}": (c,) for p in ("weight", "bias")})
    return shapes


def official_backbone_shapes(size, fpn_dim=256):
    """{name: shape} of the whole official ``backbone.*`` (Swin under bottom_up + FPN)."""
    shapes = {PREFIX + k: v for k, v in official_swin_shapes(size).items()}
    c0 = SWIN_SIZES[size]["embed_dim"]
    for s in range(4):
        shapes[f"backbone.fpn_lateral{s + 2}.weight"] = (fpn_dim, c0 * 2**s, 1, 1)
        shapes[f"backbone.fpn_output{s + 2}.weight"] = (fpn_dim, fpn_dim, 3, 3)
        shapes[f"backbone.fpn_lateral{s + 2}.bias"] = shapes[f"backbone.fpn_output{s + 2}.bias"] = (fpn_dim,)
    return shapes


def random_tensors(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            out[name] = torch.randint(0, shape[0], shape, generator=g)  # an index: integer buffer
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


def release_state_dict(size, seed=0, num_classes=1000):
    """A stand-in for the original Swin release's ``.pth`` ``model`` dict (random values): the
    detection keys minus norm0..3, plus the classifier's norm/head and the shifted blocks'
    attn_mask buffers of a 224x224 input."""
    shapes = {k: v for k, v in official_swin_shapes(size).items() if not k.startswith("norm")}
    a = SWIN_SIZES[size]
    c_last, w = a["embed_dim"] * 8, a["window_size"]
    shapes.update({"norm.weight": (c_last,), "norm.bias": (c_last,)})
    shapes.update({"head.weight": (num_classes, c_last), "head.bias": (num_classes,)})
    for s, depth in enumerate(a["depths"]):
        side = 224 // 4 // 2**s
        if side > w:  # the release shifts no window when the stage is a single window
            for b in range(1, depth, 2):
                shapes[f"layers.{s}.blocks.{b}.attn_mask"] = ((side // w) ** 2, w * w, w * w)
    return random_tensors(shapes, seed)


# (a) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["T", "B-22k"])
def test_state_dict_has_exactly_the_official_keys_and_shapes(size):
    with no_weight_init():
        backbone = build_backbone(swin_cfg(size))
    got = {"backbone." + k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert got == official_backbone_shapes(size)
    assert isinstance(backbone.bottom_up, D2SwinTransformer)


# (b) ---------------------------------------------------------------------------------------


def test_fpn_outputs_names_strides_channels_and_sizes():
    torch.manual_seed(0)
    backbone = build_backbone(swin_cfg("T", "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.DiffusionDet.HIDDEN_DIM", 32)).eval()
    assert backbone.size_divisibility == 32
    assert backbone.bottom_up.size_divisibility == 32
    shapes = backbone.output_shape()
    assert list(shapes) == ["p2", "p3", "p4", "p5", "p6"]
    assert [shapes[k].stride for k in shapes] == [4, 8, 16, 32, 64]
    assert {shapes[k].channels for k in shapes} == {32}
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 160))
    sizes = {k: tuple(v.shape) for k, v in out.items()}
    assert sizes == {"p2": (1, 32, 24, 40), "p3": (1, 32, 12, 20), "p4": (1, 32, 6, 10),
                     "p5": (1, 32, 3, 5), "p6": (1, 32, 2, 3)}  # fmt: skip
    # p6 is max-pooled (kernel 1, stride 2) from the FPN's p5, not from swin3.
    assert torch.equal(out["p6"], F.max_pool2d(out["p5"], kernel_size=1, stride=2))


def test_model_pads_a_non_multiple_of_32_image_and_runs():
    torch.manual_seed(0)
    model = build_model(swin_cfg("T")).eval()
    image = torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8).float()
    images, _ = model.preprocess_image([{"image": image}])
    assert tuple(images.tensor.shape) == (1, 3, 128, 160) and images.image_sizes == [(100, 150)]
    feats = model.extract_features(images)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 40), (16, 20), (8, 10), (4, 5)]
    with torch.no_grad():
        (result,) = model([{"image": image, "height": 100, "width": 150}])
    boxes = result["instances"].pred_boxes.tensor
    assert len(boxes) > 0 and (boxes[:, 2] <= 150).all() and (boxes[:, 3] <= 100).all()


# (c) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_features", [(0, 1, 2, 3), (1, 3)])
def test_renamed_outputs_equal_detectron2_swin_outputs(out_features):
    torch.manual_seed(0)
    cfg = swin_cfg("T", "MODEL.SWIN.OUT_FEATURES", out_features)
    ours = build_swin_backbone(cfg, ShapeSpec(channels=3)).eval()
    a = SWIN_SIZES["T"]
    plain = SwinTransformer(embed_dim=a["embed_dim"], depths=a["depths"], num_heads=a["num_heads"],
                            window_size=a["window_size"], out_indices=out_features).eval()  # fmt: skip
    plain.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 70, 100)  # non-square, not a multiple of the patch or window size
    with torch.no_grad():
        got, ref = ours(x), plain(x)
    assert list(got) == [f"swin{i}" for i in out_features]
    for i in out_features:
        assert torch.equal(got[f"swin{i}"], ref[f"p{i}"])
        spec, ref_spec = ours.output_shape()[f"swin{i}"], plain.output_shape()[f"p{i}"]
        assert (spec.channels, spec.stride) == (ref_spec.channels, ref_spec.stride) == (96 * 2**i, 2 ** (i + 2))


# (d) ---------------------------------------------------------------------------------------


def test_official_layout_detector_checkpoint_loads_every_backbone_tensor(tmp_path):
    torch.manual_seed(0)
    model = build_model(swin_cfg("T"))
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    backbone = random_tensors(official_backbone_shapes("T"), seed=1)
    assert set(state).isdisjoint(backbone)
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": {**state, **backbone}}, path)

    DetectionCheckpointer(model).load(path)
    loaded = model.state_dict()
    assert set(loaded) == set(state) | set(backbone)  # no missing, no unexpected keys
    for name, value in backbone.items():
        assert torch.equal(loaded[name], value), name


# (e) ---------------------------------------------------------------------------------------


def _load_pkl_and_check(model, pkl_path, release, checkpointer_cls=DetectionCheckpointer):
    """Load ``pkl_path``; every release tensor with a detection counterpart must be in the
    model, every other model tensor (norm0..3, FPN, head) must be unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    checkpointer_cls(model).load(pkl_path)
    after = model.state_dict()
    expected = {PREFIX + k: v for k, v in release.items() if PREFIX + k in after}
    assert len(expected) == len(official_swin_shapes("T")) - 8  # all but norm0..3
    for name in after:
        want = expected.get(name, before[name])
        assert torch.equal(after[name], want), name
    classifier = (release["norm.weight"], release["head.weight"])
    for name, value in after.items():
        assert not any(v.shape == value.shape and torch.equal(v, value) for v in classifier), name


@pytest.mark.parametrize("checkpointer_cls", [DetectionCheckpointer, DiffusionDetCheckpointer])
def test_converted_imagenet_pkl_loads_into_bottom_up(tmp_path, checkpointer_cls):
    release = release_state_dict("T", seed=2)
    converted = convert_swin_classification_checkpoint({"model": release})
    assert converted["matching_heuristics"] is True and "__author__" in converted
    dropped = {k for k in release if k.startswith(("head.", "norm.")) or k.endswith("attn_mask")}
    assert set(converted["model"]) == set(release) - dropped
    assert all(isinstance(v, np.ndarray) for v in converted["model"].values())
    path = str(tmp_path / "swin_tiny.pkl")
    with open(path, "wb") as f:
        pickle.dump(converted, f)
    torch.manual_seed(0)
    _load_pkl_and_check(build_model(swin_cfg("T")), path, release, checkpointer_cls)


def test_unconverted_release_keys_in_a_pkl_do_not_mismatch(tmp_path):
    # An official-style .pkl that kept the classifier norm/head and attn_mask: detectron2's
    # suffix heuristics must still put norm.* nowhere (patch_embed.norm / downsample.norm have
    # longer, exact matches) and leave head.* and attn_mask unmatched.
    release = release_state_dict("T", seed=3)
    model_dict = {k: v.numpy() for k, v in release.items()}
    path = str(tmp_path / "swin_tiny_full.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": model_dict, "__author__": "test", "matching_heuristics": True}, f)
    torch.manual_seed(0)
    _load_pkl_and_check(build_model(swin_cfg("T")), path, release)


def test_convert_tool_writes_the_pkl(tmp_path):
    g = torch.Generator().manual_seed(4)
    release = {
        "patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g),
        "layers.0.blocks.1.attn.qkv.weight": torch.randn(6, 2, generator=g),
        "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49),
        "norm.weight": torch.randn(16, generator=g),
        "head.weight": torch.randn(10, 16, generator=g),
    }
    src, dst = tmp_path / "swin.pth", tmp_path / "models" / "swin.pkl"
    torch.save({"model": release}, src)
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_swin_to_d2.py"), str(src), str(dst)],
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    with open(dst, "rb") as f:
        out = pickle.load(f)
    assert out["matching_heuristics"] is True
    assert set(out["model"]) == {"patch_embed.proj.weight", "layers.0.blocks.1.attn.qkv.weight"}
    for k, v in out["model"].items():
        assert np.array_equal(v, release[k].numpy()), k


# (f) ---------------------------------------------------------------------------------------

# Classification parameter counts of the Swin paper (Table 1, millions): backbone + final
# norm + 1000-class head.
PAPER_PARAMS_M = {"T": 28, "S": 50, "B": 88, "B-22k": 88, "B-22k-384": 88, "L-22k": 197, "L-22k-384": 197}


@pytest.mark.parametrize("size", sorted(SWIN_SIZES))
def test_every_size_builds_the_official_architecture(size):
    with no_weight_init():
        bottom_up = build_backbone(swin_cfg(size)).bottom_up
    a = SWIN_SIZES[size]
    assert {k: tuple(v.shape) for k, v in bottom_up.state_dict().items()} == official_swin_shapes(size)
    blocks = [blk for layer in bottom_up.layers for blk in layer.blocks]
    assert [blk.window_size for blk in blocks] == [a["window_size"]] * sum(a["depths"])
    assert blocks[-1].drop_path.drop_prob == pytest.approx(a["drop_path_rate"])
    assert all(p.requires_grad for p in bottom_up.parameters())  # frozen_stages -1
    c_last = a["embed_dim"] * 8
    n = sum(p.numel() for n_, p in bottom_up.named_parameters() if not n_.startswith("norm"))
    assert round((n + 2 * c_last + 1000 * c_last + 1000) / 1e6) == PAPER_PARAMS_M[size]


# (g) ---------------------------------------------------------------------------------------


@pytest.mark.numerics
def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    results = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        backbone = build_backbone(swin_cfg("T", "MODEL.SWIN.USE_CHECKPOINT", use_checkpoint)).train()
        assert all(layer.use_checkpoint == use_checkpoint for layer in backbone.bottom_up.layers)
        torch.manual_seed(1)  # same drop-path draws in both runs
        out = backbone(torch.randn(2, 3, 64, 96))
        weights = torch.Generator().manual_seed(2)
        loss = sum((v * torch.randn(v.shape, generator=weights)).sum() for v in out.values())
        loss.backward()
        grads = {k: p.grad.clone() for k, p in backbone.named_parameters()}
        results.append(({k: v.detach() for k, v in out.items()}, grads))
    (out_a, grad_a), (out_b, grad_b) = results
    for k in out_a:
        torch.testing.assert_close(out_b[k], out_a[k], rtol=0, atol=1e-6)
    assert grad_a.keys() == grad_b.keys()
    for k in grad_a:
        torch.testing.assert_close(grad_b[k], grad_a[k], rtol=1e-5, atol=1e-6, msg=k)
