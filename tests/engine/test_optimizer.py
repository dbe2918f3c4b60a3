"""The official optimizer recipe: AdamW, backbone LR multiplier, decay everywhere, full-model clipping."""
import torch
from torch import nn

from diffusiondet.engine import build_optimizer
from tests.utils import tiny_cfg


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_param_groups_backbone_multiplier_and_decay_on_norms():
    cfg = tiny_cfg("SOLVER.BACKBONE_MULTIPLIER", 0.1, "SOLVER.BASE_LR", 1e-3, "SOLVER.WEIGHT_DECAY", 1e-4)
    model = _Toy()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = 1e-4 if name.startswith("backbone") else 1e-3
        assert abs(lr_of[id(p)] - expected) < 1e-12, name
        assert wd_of[id(p)] == 1e-4, name  # norms and biases decayed too, as the official recipe


def test_full_model_clipping_bounds_the_global_norm():
    cfg = tiny_cfg("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5, "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", 1.0,
                   "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0)
    model = _Toy()
    opt = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    opt.step()
    # SGD with lr 1: the update is exactly the clipped gradient, whose global norm must be 0.5.
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert abs(update.norm().item() - 0.5) < 1e-5
    # The direction is unchanged (one global scale, not per-parameter clipping).
    assert torch.allclose(update, update[0].expand_as(update))


def test_fused_adamw_is_the_same_update_as_torchs_default():
    """SOLVER.FUSED_ADAMW selects torch's fused kernel; clipping still applies; same trajectory."""
    trajectories = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _Toy()
        initial = [p.detach().clone() for p in model.parameters()]
        cfg = tiny_cfg("SOLVER.FUSED_ADAMW", fused, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.5)
        opt = build_optimizer(cfg, model)
        assert all(g.get("fused") is (True if fused else None) for g in opt.param_groups)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) * 4  # large: the clipping is active
            opt.step()
        trajectories[fused] = [p.detach().clone() for p in model.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(trajectories[True], initial))
    assert moved > 1e-4
    # Float rounding only (the kernels order the same arithmetic differently).
    for a, b in zip(trajectories[True], trajectories[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
