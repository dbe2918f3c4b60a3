"""FOLD_FROZEN_BN: the R-50 backbone with its frozen BatchNorms folded in at inference equals the
unfolded one within float rounding, keeps its parameters and state dict, and trains as before."""
import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from diffusiondet.modeling.acceleration.frozen_bn_folding import (
    FoldedFrozenBNConv2d,
    fold_frozen_batchnorm_at_inference,
)
from tests.utils import tiny_cfg

pytestmark = pytest.mark.numerics

R50 = ["MODEL.RESNETS.DEPTH", 50, "MODEL.RESNETS.RES2_OUT_CHANNELS", 256, "MODEL.RESNETS.NORM", "FrozenBN",
       "MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.RESNETS.STRIDE_IN_1X1", True]  # fmt: skip


def build(fold):
    cfg = tiny_cfg(*R50, "MODEL.DiffusionDet.FOLD_FROZEN_BN", fold)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    # BN statistics away from (0, 1), so that folding is not the identity.
    for layer in model.backbone.modules():
        if isinstance(layer, FrozenBatchNorm2d):
            layer.weight.copy_(0.5 + torch.rand(layer.weight.shape, generator=g))
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g) * 0.1)
            layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))
    return model


def test_folded_backbone_equals_unfolded_at_inference_and_keeps_its_state():
    plain, folded = build(False), build(True)
    switched = [m for m in folded.backbone.modules() if isinstance(m, FoldedFrozenBNConv2d)]
    assert len(switched) == 53  # every conv of R-50 has a frozen BN (FPN convs have none)
    assert not any(isinstance(m, FoldedFrozenBNConv2d) for m in plain.backbone.modules())
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(2)) * 50
    with torch.no_grad():
        want, got = plain.backbone(x), folded.backbone(x)
    for name in want:
        scale = want[name].abs().max()
        assert scale > 0
        # Measured 7.2e-6 of the level's largest value, native and AVX2 (folded-product rounding).
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-5 * scale)
    after = folded.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_training_runs_the_unfolded_computation():
    plain, folded = build(False), build(True)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    want = plain.backbone(x)["p2"]  # gradients enabled: detectron2's own forward
    got = folded.backbone(x)["p2"]
    assert torch.equal(got, want) and got.is_contiguous()


def test_only_frozen_bn_convolutions_are_switched():
    cfg = tiny_cfg()  # GroupNorm ResNet-18: nothing to fold
    model = build_model(cfg)
    assert fold_frozen_batchnorm_at_inference(model.backbone) == 0
