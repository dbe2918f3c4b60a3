"""torchvision ResNet -> detectron2 ``.pkl`` conversion (``diffusiondet.modeling.backbone.
resnet_weights`` and ``tools/convert_torchvision_resnet_to_d2.py``), checked against the official
ResNet-101 config.

The torchvision weights are random (no download), with BatchNorm statistics and affine parameters
made far from 0/1 so that a BatchNorm tensor loaded into the wrong layer, or not loaded at all
(FrozenBN's default is the identity), changes the features.
"""
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from diffusiondet.engine.checkpoint import DiffusionDetCheckpointer
from diffusiondet.modeling.backbone.resnet_weights import save_d2_pickle, torchvision_resnet_to_d2
from diffusioninst import build_config
from tests.utils import TINY_OPTS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RES101_CONFIG = os.path.join(REPO, "configs", "diffdet.coco.res101.yaml")
TOOL = os.path.join(REPO, "tools", "convert_torchvision_resnet_to_d2.py")
PREFIX = "backbone.bottom_up."
# The official config's backbone (depth 101, FrozenBN, stride in the 3x3) under the tiny test head.
RES101_OPTS = ["MODEL.RESNETS.DEPTH", 101, "MODEL.RESNETS.NORM", "FrozenBN",
               "MODEL.RESNETS.RES2_OUT_CHANNELS", 256]  # fmt: skip
RES18_OPTS = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.NORM", "FrozenBN",
              "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]  # fmt: skip


def torchvision_resnet(depth, seed=0):
    """An eval-mode torchvision ResNet with random weights and non-trivial BatchNorm tensors.

    The affine parameters are drawn away from 1 and 0 first; the running statistics are then
    those of one train-mode batch, so that they are neither 0/1 nor out of step with the weights
    (stale statistics would compound over ResNet-101's 33 blocks into huge activations).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # running stats := this batch's statistics
        model.train()(torch.randn(2, 3, 48, 64))
    return model.eval()


def tiny_model(*opts):
    """DiffusionDet from the official ResNet-101 config with the tiny head, on CPU, in eval mode."""
    # The converter is checked against detectron2's own BN computation: FOLD_FROZEN_BN's
    # folded products round differently (its own test is
    # tests/modeling/acceleration/test_frozen_bn_folding.py).
    fold = ["MODEL.DiffusionDet.FOLD_FROZEN_BN", False]
    cfg = build_config(RES101_CONFIG, [*TINY_OPTS, *RES101_OPTS, *fold, *opts])
    return build_model(cfg).eval()


def torchvision_features(model, x):
    """torchvision's stem and layer1..4 outputs, named as detectron2's res2..res5."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(model, f"layer{i}")(x)
        out[f"res{i + 1}"] = x
    return out


def image(seed=1, height=64, width=96):
    """A non-square, roughly normalised batch, as the backbone sees it after PIXEL_MEAN/STD."""
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared CPU a second one spins and makes ResNet-101 many times slower;
    the results do not depend on it (the numerics re-run uses one thread anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def r101(tmp_path_factory):
    """(torchvision's res2..res5 on ``image()``, its detectron2 renaming, the pickle path)."""
    tv = torchvision_resnet(101)
    converted = torchvision_resnet_to_d2(tv.state_dict())
    path = str(tmp_path_factory.mktemp("r101") / "torchvision-R-101.pkl")
    save_d2_pickle(converted, path)
    with torch.no_grad():
        features = torchvision_features(tv, image())
    return features, converted, path


@pytest.fixture(scope="module")
def loaded_r101(r101):
    """(model, its state before loading) for the official res101 config after loading the pickle
    with detectron2's DetectionCheckpointer; the ResNet was NaN before, so unloaded tensors show."""
    model = tiny_model()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.startswith(PREFIX):
                v.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DetectionCheckpointer(model).load(r101[2])
    return model, before


def test_pickle_layout(r101):
    _, converted, path = r101
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert set(data["model"]) == set(converted)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in data["model"].values())
    # 4 stages of (3, 4, 23, 3) bottlenecks: 3 convs + 1 shortcut per stage, 5 tensors per conv+BN.
    assert len(converted) == 5 * (1 + 3 * (3 + 4 + 23 + 3) + 4)
    assert not any("fc" in k or "num_batches_tracked" in k for k in data["model"])


def test_pickle_loads_into_every_backbone_tensor(r101, loaded_r101):
    converted = r101[1]
    model, before = loaded_r101
    after = model.state_dict()
    resnet = {k[len(PREFIX):]: v for k, v in after.items() if k.startswith(PREFIX)}
    assert set(resnet) == set(converted)
    for name, value in converted.items():
        assert torch.equal(resnet[name], value), name
    # Suffix matching must not have touched the FPN or the head.
    for k, v in after.items():
        if not k.startswith(PREFIX):
            assert torch.equal(v, before[k]), k


def _loaded_bottom_up(path, *opts, checkpointer=DetectionCheckpointer):
    model = tiny_model(*opts)
    checkpointer(model).load(path)
    return model.backbone.bottom_up


def _assert_features_equal(d2_out, tv_out):
    for name in ("res2", "res3", "res4", "res5"):
        assert d2_out[name].shape == tv_out[name].shape, name
        assert tv_out[name].abs().mean() > 0.05, name  # not vanished: the comparison has teeth
        # Same convolutions, same eps. Without grad FrozenBN even calls the same F.batch_norm as
        # torchvision's eval BatchNorm; with grad it folds to x * scale + shift, which differs
        # from (x - mean) / sqrt(var + eps) * w + b in rounding only: hence a tolerance.
        torch.testing.assert_close(d2_out[name], tv_out[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.numerics
def test_resnet101_features_match_torchvision(r101, loaded_r101):
    tv_out = r101[0]
    with torch.no_grad():
        d2_out = loaded_r101[0].backbone.bottom_up(image())
    assert d2_out["res5"].shape == (1, 2048, 2, 3)
    _assert_features_equal(d2_out, tv_out)


@pytest.mark.numerics
def test_stride_in_1x1_true_breaks_torchvision_weights(r101):
    """The config's STRIDE_IN_1X1 False is needed: striding in the 1x1 conv (the MSRA layout)
    changes every strided block, res3 onwards; res2 has no stride and is unaffected."""
    tv_out, _, path = r101
    bottom_up = _loaded_bottom_up(path, "MODEL.RESNETS.STRIDE_IN_1X1", True)
    with torch.no_grad():
        d2_out = bottom_up(image())
    torch.testing.assert_close(d2_out["res2"], tv_out["res2"], atol=1e-4, rtol=1e-4)
    for name in ("res3", "res4", "res5"):
        assert d2_out[name].shape == tv_out[name].shape
        assert (d2_out[name] - tv_out[name]).abs().max() > 0.1, name


@pytest.mark.numerics
def test_resnet18_basic_blocks_match_torchvision(tmp_path):
    tv = torchvision_resnet(18, seed=3)
    converted = torchvision_resnet_to_d2(tv.state_dict())
    assert len(converted) == 5 * (1 + 2 * (2 + 2 + 2 + 2) + 3)  # no shortcut in the first stage
    path = str(tmp_path / "r18.pkl")
    save_d2_pickle(converted, path)
    # The project's own checkpointer (the one training uses) must accept the pickle as well.
    bottom_up = _loaded_bottom_up(path, *RES18_OPTS, checkpointer=DiffusionDetCheckpointer)
    x = image(seed=4, height=80, width=112)
    with torch.no_grad():
        _assert_features_equal(bottom_up(x), torchvision_features(tv, x))


def test_tool_converts_a_pth(tmp_path):
    sd = torchvision_resnet(18, seed=5).state_dict()
    src, dst = tmp_path / "resnet18.pth", tmp_path / "models" / "torchvision-R-18.pkl"
    torch.save(sd, src)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, TOOL, str(src), str(dst)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Converted 100 tensors (22 dropped" in proc.stdout  # 122 = 100 + 20 counters + fc
    with open(dst, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    assert len(data["model"]) == 100
    np.testing.assert_array_equal(data["model"]["stem.conv1.weight"], sd["conv1.weight"].numpy())
    np.testing.assert_array_equal(data["model"]["res5.1.conv2.norm.running_var"],
                                  sd["layer4.1.bn2.running_var"].numpy())  # fmt: skip
    np.testing.assert_array_equal(data["model"]["res3.0.shortcut.norm.bias"],
                                  sd["layer2.0.downsample.1.bias"].numpy())  # fmt: skip


def _tool_main():
    spec = importlib.util.spec_from_file_location("convert_tv_resnet", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_tool_unwraps_training_checkpoints(tmp_path, wrapper):
    sd = torchvision_resnet(18, seed=6).state_dict()
    torch.save({wrapper: sd, "epoch": 90}, tmp_path / "ckpt.pth")
    _tool_main()([str(tmp_path / "ckpt.pth"), str(tmp_path / "out.pkl")])
    with open(tmp_path / "out.pkl", "rb") as f:
        model = pickle.load(f)["model"]
    np.testing.assert_array_equal(model["res4.0.conv1.weight"], sd["layer3.0.conv1.weight"].numpy())


def vgg_like_state_dict():
    """The key layout of torchvision's VGG (small tensors: a real VGG-11 is half a gigabyte)."""
    return {
        "features.0.weight": torch.randn(8, 3, 3, 3), "features.0.bias": torch.randn(8),
        "classifier.0.weight": torch.randn(10, 8), "classifier.0.bias": torch.randn(10),
    }  # fmt: skip


def test_non_resnet_is_rejected():
    message = "not a torchvision ResNet.*conv1.weight.*features.0.weight"  # names what it found
    with pytest.raises(ValueError, match=message):
        torchvision_resnet_to_d2(vgg_like_state_dict())
    with pytest.raises(ValueError, match="expected a state dict"):
        torchvision_resnet_to_d2([torch.zeros(1)])


def test_unknown_or_incomplete_resnet_keys_are_rejected():
    sd = torchvision_resnet(18, seed=7).state_dict()
    # A ResNet with extra modules (squeeze-excitation, a DataParallel "module." copy) is not
    # torchvision's: silently dropping those tensors would load a different network.
    for extra in ("layer1.0.se.fc1.weight", "module.conv1.weight", "layer5.0.conv1.weight"):
        with pytest.raises(ValueError, match=f"unknown keys {extra}"):
            torchvision_resnet_to_d2({**sd, extra: torch.zeros(1)})
    partial = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
    message = "missing BatchNorm tensors.*res3.1.conv1.norm.running_var"
    with pytest.raises(ValueError, match=message):
        torchvision_resnet_to_d2(partial)


def test_tool_reports_a_non_resnet(tmp_path, capsys):
    torch.save(vgg_like_state_dict(), tmp_path / "vgg.pth")
    with pytest.raises(SystemExit) as exc:
        _tool_main()([str(tmp_path / "vgg.pth"), str(tmp_path / "out.pkl")])
    assert exc.value.code == 2
    assert "vgg.pth: not a torchvision ResNet state dict" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()
