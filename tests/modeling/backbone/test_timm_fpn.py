"""timm models as FPN backbones: levels chosen by stride, frozen stages / BatchNorm, local weights."""
import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from diffusiondet.modeling.backbone.timm_fpn import TimmBackbone
from tests.utils import tiny_cfg

timm = pytest.importorskip("timm")  # part of the pinned install; the import is what is tested

# Two families whose timm feature indices differ: ConvNeXt's start at stride 4, EfficientNet's at 2.
FAMILIES = ["convnext_atto", "efficientnet_b0"]


def timm_cfg(name, *opts):
    return tiny_cfg(
        "MODEL.BACKBONE.NAME", "build_timm_fpn_backbone",
        "MODEL.TIMM.NAME", name,
        "MODEL.FPN.IN_FEATURES", ["c2", "c3", "c4", "c5"],
        *opts,
    )  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_fpn_levels_come_from_the_timm_features_of_each_stride(name):
    torch.manual_seed(0)
    cfg = timm_cfg(name, "MODEL.TIMM.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0)
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert backbone.output_shape().keys() == {"p2", "p3", "p4", "p5", "p6"}
    assert {k: v.stride for k, v in backbone.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert "fpn_lateral2.weight" in dict(backbone.named_parameters())

    # The same timm model with the same weights: c_k must be its feature of stride 2^k.
    reference = timm.create_model(name, features_only=True).eval()
    reference.load_state_dict(backbone.bottom_up.body.state_dict())
    image = torch.randn(2, 3, 96, 160)  # non-square
    with torch.no_grad():
        ours = backbone.bottom_up(image)
        theirs = {f"c{(r).bit_length() - 1}": f for r, f in zip(reference.feature_info.reduction(), reference(image))}
        outputs = backbone(image)
    for level in ("c2", "c3", "c4", "c5"):
        assert torch.equal(ours[level], theirs[level]), level
        assert ours[level].shape[-2:] == (96 // 2 ** int(level[1]), 160 // 2 ** int(level[1]))
    assert outputs["p2"].shape == (2, 32, 24, 40)
    assert outputs["p6"].shape == (2, 32, 2, 3)


def test_levels_the_model_does_not_have_fail_clearly():
    with pytest.raises(ValueError, match=r"offers levels \['c2', 'c3', 'c4', 'c5'\], asked for \['c1'"):
        TimmBackbone(model_name="convnext_atto", out_features=("c1", "c2"))


@pytest.mark.parametrize("name, last_frozen, first_trained", [
    ("efficientnet_b0", "blocks.1", "blocks.2"),  # stride-4 stage is blocks.1
    ("convnext_atto", "stages_0", "stages_1"),  # stride-4 stage is the first stage
])  # fmt: skip
def test_freeze_at_2_freezes_the_stem_and_the_stride_4_stage(name, last_frozen, first_trained):
    backbone = TimmBackbone(model_name=name, norm="BN", freeze_at=2)
    trainable = {n: p.requires_grad for n, p in backbone.body.named_parameters()}
    frozen_prefix, trained_prefix = last_frozen + ".", first_trained + "."
    first_param = next(iter(trainable))
    assert not trainable[first_param]  # the stem
    assert all(not t for n, t in trainable.items() if n.startswith(frozen_prefix))
    assert any(n.startswith(frozen_prefix) for n in trainable)
    assert all(t for n, t in trainable.items() if n.startswith(trained_prefix))
    names = list(trainable)
    boundary = next(i for i, n in enumerate(names) if n.startswith(trained_prefix))
    assert all(not trainable[n] for n in names[:boundary]) and all(trainable[n] for n in names[boundary:])

    if name == "efficientnet_b0":
        # Frozen stages also keep their BatchNorm statistics in training mode; later ones learn.
        before = {n: b.clone() for n, b in backbone.body.named_buffers() if "running_mean" in n}
        backbone.train()(torch.randn(2, 3, 64, 96))
        changed = {n for n, b in backbone.body.named_buffers() if "running_mean" in n and not torch.equal(b, before[n])}
        assert changed and all(n.startswith(("blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6")) for n in changed)


def test_freeze_at_0_trains_everything():
    backbone = TimmBackbone(model_name="efficientnet_b0", norm="BN", freeze_at=0)
    assert all(p.requires_grad for p in backbone.parameters())


def test_frozen_bn_never_updates_and_matches_eval_mode():
    torch.manual_seed(0)
    backbone = TimmBackbone(model_name="efficientnet_b0", norm="FrozenBN", freeze_at=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules())
    image = torch.randn(2, 3, 64, 96)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_out = backbone.train()(image)
    eval_out = backbone.eval()(image)
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())
    assert all(torch.equal(train_out[k], eval_out[k]) for k in train_out)
    # Only the frozen statistics are frozen: the affine and conv weights still train.
    assert all(p.requires_grad for p in backbone.parameters())


def test_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("convnext_atto")
    path = tmp_path / "convnext_atto.pth"
    torch.save(classifier.state_dict(), path)
    backbone = TimmBackbone(model_name="convnext_atto", weights=str(path))
    assert torch.equal(backbone.body.stem_0.weight, classifier.stem[0].weight)
    assert torch.equal(backbone.body.stages_3.blocks[1].mlp.fc2.weight, classifier.stages[3].blocks[1].mlp.fc2.weight)
    # The weights of another model are refused instead of silently leaving random weights.
    with pytest.raises(ValueError, match="backbone tensors are not in the file"):
        TimmBackbone(model_name="efficientnet_b0", weights=str(path))
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        TimmBackbone(model_name="convnext_atto", weights=str(tmp_path / "no-such.pth"))


def test_config_checks_name_and_norm():
    with pytest.raises(ValueError, match="MODEL.TIMM.NAME must name a timm model"):
        tiny_cfg("MODEL.BACKBONE.NAME", "build_timm_fpn_backbone")
    with pytest.raises(ValueError, match="MODEL.TIMM.NORM must be one of"):
        timm_cfg("convnext_atto", "MODEL.TIMM.NORM", "GN")
