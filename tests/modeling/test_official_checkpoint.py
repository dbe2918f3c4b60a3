"""Official DiffusionDet checkpoints (detectron2 ``.pth``, ``model`` entry) load key for key.

Shape legend: S stages (6), K classes (80 COCO / 1203 LVIS), D hidden dim (256), F FFN width
(2048), DD dynamic dim (64), E = 4·D time-MLP width, R pooler resolution (7).

The official key layout is enumerated here from the official head's modules and standard
ResNet/FPN shapes, never from our model, so that loading a file written in that layout is a real
compatibility test.
"""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from diffusiondet.engine import build_config

DIFFUSION_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)  # fmt: skip
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
CONFIGS = {  # config file -> (ResNet depth, K, has fed-loss weights)
    "diffdet.coco.res50.yaml": (50, 80, False),
    "diffdet.coco.res101.yaml": (101, 80, False),
    "diffdet.lvis.res50.yaml": (50, 1203, True),
    "diffdet.lvis.res101.yaml": (101, 1203, True),
}


def official_head_layout(num_classes, hidden_dim=256, dim_feedforward=2048, dim_dynamic=64,
                         num_stages=6, resolution=7):  # fmt: skip
    """Official head keys -> shapes (``head.head_series.{i}.*`` and ``head.time_mlp.*``)."""
    d, f, dd, e = hidden_dim, dim_feedforward, dim_dynamic, 4 * hidden_dim
    stage = {
        "self_attn.in_proj_weight": (3 * d, d), "self_attn.in_proj_bias": (3 * d,),
        "self_attn.out_proj.weight": (d, d), "self_attn.out_proj.bias": (d,),
        "inst_interact.dynamic_layer.weight": (2 * d * dd, d),
        "inst_interact.dynamic_layer.bias": (2 * d * dd,),
        "inst_interact.norm1.weight": (dd,), "inst_interact.norm1.bias": (dd,),
        "inst_interact.norm2.weight": (d,), "inst_interact.norm2.bias": (d,),
        "inst_interact.out_layer.weight": (d, d * resolution**2),
        "inst_interact.out_layer.bias": (d,),
        "inst_interact.norm3.weight": (d,), "inst_interact.norm3.bias": (d,),
        "linear1.weight": (f, d), "linear1.bias": (f,),
        "linear2.weight": (d, f), "linear2.bias": (d,),
        "block_time_mlp.1.weight": (2 * d, e), "block_time_mlp.1.bias": (2 * d,),
        "cls_module.0.weight": (d, d),
        "class_logits.weight": (num_classes, d), "class_logits.bias": (num_classes,),
        "bboxes_delta.weight": (4, d), "bboxes_delta.bias": (4,),
    }  # fmt: skip
    for norm in ("norm1", "norm2", "norm3", "cls_module.1", "reg_module.1", "reg_module.4",
                 "reg_module.7"):  # fmt: skip
        stage[f"{norm}.weight"] = stage[f"{norm}.bias"] = (d,)
    for linear in ("reg_module.0", "reg_module.3", "reg_module.6"):
        stage[f"{linear}.weight"] = (d, d)
    layout = {
        f"head.head_series.{i}.{name}": shape
        for i in range(num_stages)
        for name, shape in stage.items()
    }
    layout.update({
        "head.time_mlp.1.weight": (e, d), "head.time_mlp.1.bias": (e,),
        "head.time_mlp.3.weight": (e, e), "head.time_mlp.3.bias": (e,),
    })  # fmt: skip
    return layout


def official_resnet_fpn_layout(depth, fpn_channels=256):
    """detectron2 ResNet (torchvision-style bottlenecks, FrozenBN) + FPN keys -> shapes."""
    layout = {}

    def conv(prefix, out_channels, in_channels, kernel):
        layout[f"{prefix}.weight"] = (out_channels, in_channels, kernel, kernel)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{prefix}.norm.{buffer}"] = (out_channels,)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
        bottleneck, out_channels = 64 * 2**stage, 256 * 2**stage
        for j in range(blocks):
            prefix = f"backbone.bottom_up.res{stage + 2}.{j}"
            if j == 0:
                conv(f"{prefix}.shortcut", out_channels, in_channels, 1)
            conv(f"{prefix}.conv1", bottleneck, in_channels, 1)
            conv(f"{prefix}.conv2", bottleneck, bottleneck, 3)
            conv(f"{prefix}.conv3", out_channels, bottleneck, 1)
            in_channels = out_channels
        layout[f"backbone.fpn_lateral{stage + 2}.weight"] = (fpn_channels, out_channels, 1, 1)
        layout[f"backbone.fpn_lateral{stage + 2}.bias"] = (fpn_channels,)
        layout[f"backbone.fpn_output{stage + 2}.weight"] = (fpn_channels, fpn_channels, 3, 3)
        layout[f"backbone.fpn_output{stage + 2}.bias"] = (fpn_channels,)
    return layout


def official_state_dict(depth, num_classes, fed_loss, seed=0):
    """A random state dict in the official layout (float32; diffusion buffers float64)."""
    layout = {**official_resnet_fpn_layout(depth), **official_head_layout(num_classes)}
    if fed_loss:
        layout["criterion.fed_loss_cls_weights"] = (num_classes,)
    g = torch.Generator().manual_seed(seed)
    # Every tensor is a view of one random buffer at its own offset: the saved file stores the
    # buffer once (~35 MB instead of ~0.5 GB) while each key still gets distinct values.
    pool = torch.randn(max(torch.Size(s).numel() for s in layout.values()) + 4096, generator=g)
    state = {}
    for index, (name, shape) in enumerate(layout.items()):
        offset = (index * 97) % 4096
        state[name] = pool[offset : offset + torch.Size(shape).numel()].view(shape)
    for name in DIFFUSION_BUFFERS:
        state[name] = torch.rand(1000, generator=g, dtype=torch.float64)
    return state


def test_enumerated_head_layout_matches_the_official_fixture_and_counts(parity):
    meta = parity["meta"]
    small = official_head_layout(
        meta["num_classes"], meta["hidden_dim"], meta["dim_feedforward"], meta["dim_dynamic"]
    )
    assert small == {name: tuple(value.shape) for name, value in parity["head_state_dict"].items()}
    coco = official_head_layout(80)
    assert len([k for k in coco if k.startswith("head.head_series.0.")]) == 42
    assert len(coco) + len(DIFFUSION_BUFFERS) == 268  # official COCO non-backbone keys
    assert sum(torch.Size(s).numel() for s in coco.values()) == 83_874_040


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config_model(request):
    opts = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"]
    cfg = build_config(os.path.join(CONFIG_DIR, request.param), opts)
    return request.param, build_model(cfg).eval()


def test_official_checkpoint_loads_with_no_missing_or_unexpected_keys(config_model, tmp_path):
    config, model = config_model
    depth, num_classes, fed_loss = CONFIGS[config]
    state = official_state_dict(depth, num_classes, fed_loss)
    path = str(tmp_path / "official.pth")
    torch.save({"model": state}, path)

    checkpointer = DetectionCheckpointer(model)
    reported = []
    log_incompatible = checkpointer._log_incompatible_keys

    def record(keys):  # load() only logs missing / unexpected / mis-shaped keys: keep them
        reported.append(keys)
        log_incompatible(keys)

    checkpointer._log_incompatible_keys = record
    checkpointer.load(path)
    (incompatible,) = reported
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []

    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == value.dtype, name
        assert torch.equal(loaded[name], value), name
    model.load_state_dict(state, strict=True)  # second opinion from torch itself


def test_fixture_head_loads_strictly_into_a_diffusiondet_of_the_same_size(parity):
    meta = parity["meta"]
    cfg = build_config(os.path.join(CONFIG_DIR, "diffdet.coco.res50.yaml"), [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.FPN.OUT_CHANNELS", meta["hidden_dim"],
        "MODEL.DiffusionDet.HIDDEN_DIM", meta["hidden_dim"],
        "MODEL.DiffusionDet.DIM_FEEDFORWARD", meta["dim_feedforward"],
        "MODEL.DiffusionDet.NHEADS", meta["nheads"],
        "MODEL.DiffusionDet.DIM_DYNAMIC", meta["dim_dynamic"],
        "MODEL.DiffusionDet.NUM_HEADS", meta["num_stages"],
        "MODEL.DiffusionDet.NUM_CLASSES", meta["num_classes"],
    ])  # fmt: skip
    model = build_model(cfg).eval()
    # Full official names ("head." prefix included) into the whole detector, strictly.
    model.load_state_dict({**model.state_dict(), **parity["head_state_dict"]}, strict=True)
    with torch.no_grad():
        out = model.head(parity["features"], parity["train_noisy_boxes"], parity["train_t"])
    # Stage 0 is free of the chaotic amplification of later stages (see test_head.py).
    assert (out["pred_logits"][0] - parity["train_head_logits"][0]).abs().max() <= 1e-4
