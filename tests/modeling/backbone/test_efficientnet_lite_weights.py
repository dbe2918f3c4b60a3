"""The packaged ImageNet EfficientNet-Lite0 weights, renamed for timm, compute what the package does."""
import pytest
import torch

from detectron2.modeling import build_model

from diffusiondet.modeling.backbone.efficientnet_lite_weights import (
    efficientnet_lite0_package_path,
    efficientnet_lite0_package_state_dict,
    efficientnet_lite_to_timm,
)
from diffusioninst import build_config

timm = pytest.importorskip("timm")
efficientnet_lite = pytest.importorskip("efficientnet_lite_pytorch")

CONFIG = "configs/diffdet.effnet_lite0.pretrained.cpu.yaml"


@pytest.fixture(scope="module")
def package_model():
    model = efficientnet_lite.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=efficientnet_lite0_package_path()
    )
    return model.eval()


@pytest.mark.numerics
def test_renamed_weights_give_the_package_models_logits(package_model):
    timm_model = timm.create_model("tf_efficientnet_lite0")
    timm_model.load_state_dict(efficientnet_lite0_package_state_dict(), strict=True)
    timm_model.eval()
    # Non-square, and multiples of 32 as the detector's padded batches are: there the package's
    # padding (fixed for 224 px) and timm's TensorFlow "same" padding coincide.
    image = torch.randn(2, 3, 192, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = package_model(image)
        got = timm_model(image)
    # The same convolutions on the same data; only the padding code differs between the two.
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Real ImageNet weights are confident on some class, random ones are not.
    assert expected.abs().max() > 3.0


def test_pretrained_config_loads_the_packaged_weights():
    cfg = build_config(CONFIG, ["MODEL.DiffusionDet.NUM_CLASSES", 3])
    model = build_model(cfg)
    body = model.backbone.bottom_up.body
    packaged = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    assert torch.equal(body.conv_stem.weight, packaged["_conv_stem.weight"])
    # Block 5 is the first of stage 3 (Lite0 repeats 1, 2, 2, 3, ...): its expansion conv.
    assert torch.equal(body.blocks[3][0].conv_pw.weight, packaged["_blocks.5._expand_conv.weight"])
    assert torch.equal(body.blocks[0][0].bn1.running_var, packaged["_blocks.0._bn1.running_var"])
    # FREEZE_AT 2: stem and stride-4 stage frozen, the rest trains.
    assert not body.conv_stem.weight.requires_grad and not body.blocks[1][1].conv_dw.weight.requires_grad
    assert body.blocks[2][0].conv_pw.weight.requires_grad


def test_conversion_refuses_what_it_does_not_understand():
    packaged = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="not an efficientnet-lite-pytorch key"):
        efficientnet_lite_to_timm({**packaged, "head.weight": torch.zeros(1)})
    without_last_block = {k: v for k, v in packaged.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(ValueError, match="expected blocks 0..15"):
        efficientnet_lite_to_timm(without_last_block)
    with pytest.raises(ValueError, match="unknown block sub-module '_se_reduce'"):
        efficientnet_lite_to_timm({**packaged, "_blocks.3._se_reduce.weight": torch.zeros(1)})
