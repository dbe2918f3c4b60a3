"""Train a tiny text-to-image latent diffusion model on the embedded synthetic set, on a CPU.

DiffusionEngine (arXiv 2309.03893, Sec. 3) taps a *pretrained* text-to-image U-Net; random weights
test the plumbing but cannot show the effect. This module trains the tiny Stable-Diffusion-like
components of :func:`diffusionengine.tiny_sd.tiny_sd_components` (docs/diffusion_engine.md §2) in
the recipe of latent diffusion, at a CPU scale:

1. ``vae``: the AutoencoderKL as an autoencoder on random crops of the TRAIN images (L1 + MSE
   reconstruction + a small KL term; the model is fully convolutional, crops are cheaper than
   whole images). Then ``scaling_factor`` = 1 / std of the latents of all TRAIN images, as SD sets
   it, so the diffusion sees unit-variance latents.
2. ``unet``: epsilon prediction on the frozen VAE's latents (x ``scaling_factor``) with the DDIM
   scheduler's training schedule (``add_noise`` at uniform t), prompts
   ``class_prompt(<= 4 names of the classes present>)`` (random subset and order, as the public
   code draws <= 4 names, docs §1.2) and :attr:`TinyLDMConfig.uncond_prob` empty prompts, the
   unconditional branch of classifier-free guidance.

The text encoder stays frozen at its seeded random init: it is a fixed, deterministic function of
the prompt (distinct prompts give distinct embeddings, and the U-Net's cross-attention learns to
read them), so its output is cached per prompt, and the trained and a re-initialised U-Net (the
baseline of the demo) share the same VAE and text encoder.

A run is a function of its config: the same config gives bit-identical weights on one machine,
and a killed run resumes from ``<out>/checkpoint.pth`` (weights, optimizers, step, generator and
global RNG states; written atomically) to the same result. The end product is a diffusers folder
``<out>/pipeline`` (:func:`diffusionengine.tiny_sd.save_sd_folder`), written only when every
weight is finite, ``samples.png`` and ``summary.json``.

Shape shorthand: N images, B batch, H W pixels, h w latent (H/8, W/8), C=4 latent channels,
L=77 tokens, D text width.
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from diffusiondet.engine.checkpoint import atomic_write, check_finite_state
from diffusiondet.utils.rng_state import capture_rng_state, mixed_seed, restore_rng_state

from .tiny_ldm_data import ImageSet, PromptEmbeddings, draw_prompt, load_coco_images, synthetic_train_set

__all__ = ["ImageSet", "TinyLDMConfig", "load_coco_images", "synthetic_train_set", "train_tiny_ldm"]

CHECKPOINT = "checkpoint.pth"
PIPELINE = "pipeline"
SUMMARY = "summary.json"  # written last: its presence marks a finished run


@dataclasses.dataclass(frozen=True)
class TinyLDMConfig:
    """Everything a run depends on (stored in the checkpoint; a resume must match it)."""

    vae_steps: int = 600  # stage 1 optimizer steps
    unet_steps: int = 1500  # stage 2 optimizer steps
    batch_size: int = 16  # images per step of both stages
    seed: int = 0  # initial weights (tiny_sd_components) and every draw of the run
    size: int = 160  # training images are size x size pixels (latent size/8)
    vae_crop: int = 64  # stage 1 trains on random crops of this many pixels (multiple of 8)
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10% of the lr
    kl_weight: float = 1e-4  # KL(posterior || N(0, I)) per latent element; small, as in LDM
    uncond_prob: float = 0.1  # share of empty prompts (classifier-free guidance)
    checkpoint_period: int = 100  # optimizer steps between checkpoints

    def __post_init__(self):
        if self.size % 8 or self.vae_crop % 8 or not 8 <= self.vae_crop <= self.size:
            raise ValueError(f"size ({self.size}) and vae_crop ({self.vae_crop}) must be multiples"
                             " of 8 (the VAE's factor) with 8 <= vae_crop <= size")
        if min(self.vae_steps, self.unet_steps) < 0 or self.batch_size < 1 or self.checkpoint_period < 1:
            raise ValueError(f"steps must be >= 0, batch_size and checkpoint_period >= 1: {self}")


def _lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def _to_signal(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], the SD pipelines' pixel range


def _vae_loss(vae, data: ImageSet, cfg: TinyLDMConfig, gen: torch.Generator) -> torch.Tensor:
    b, c, (h, w) = cfg.batch_size, cfg.vae_crop, data.images.shape[2:]
    idx = torch.randint(len(data.images), (b,), generator=gen)
    offsets = (torch.rand(b, 2, generator=gen) * torch.tensor([h - c + 1, w - c + 1])).long().tolist()
    flips = torch.rand(b, generator=gen) < 0.5
    crops = [data.images[i, :, y : y + c, x : x + c] for i, (y, x) in zip(idx.tolist(), offsets)]
    x = _to_signal(torch.stack([im.flip(-1) if f else im for im, f in zip(crops, flips)]))  # (B, 3, c, c)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    recon = vae.decode(z).sample  # (B, 3, c, c)
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.kl_weight * kl


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, batch: int = 32):
    """Posterior mean and std of every image: two (N, C, h, w) tensors (fixed batches, so the
    bits do not depend on anything but the weights)."""
    means, stds = [], []
    for start in range(0, len(images), batch):
        posterior = vae.encode(_to_signal(images[start : start + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _latent_scaling(latents) -> float:
    """SD's ``scaling_factor``, 1 / std of the latents: the std of z = mean + std * eps over all
    elements of all images is sqrt(Var[mean] + E[std^2]), no draw needed."""
    mean, std = latents
    return float(1.0 / torch.sqrt(mean.var() + std.pow(2).mean()))


def _unet_loss(unet, scheduler, latents, scaling, data, embed, cfg, gen) -> torch.Tensor:
    mean, std = latents
    idx = torch.randint(len(mean), (cfg.batch_size,), generator=gen)
    z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling  # (B, C, h, w)
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
    prompts = [draw_prompt(data.class_names[i], cfg.uncond_prob, gen) for i in idx.tolist()]
    pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=embed(prompts)).sample
    return F.mse_loss(pred, noise)


def _state(cfg, stage, step, comps, opts, gen, scaling, losses, seconds) -> dict:
    return {"version": 1, "config": dataclasses.asdict(cfg), "stage": stage, "step": step,
            "vae": comps.vae.state_dict(), "unet": comps.unet.state_dict(),
            "vae_opt": opts["vae"].state_dict(), "unet_opt": opts["unet"].state_dict(),
            "generator": gen.get_state(), "rng": capture_rng_state(), "scaling_factor": scaling,
            "losses": losses, "seconds": seconds}


def _load_checkpoint(path: str, cfg: TinyLDMConfig) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != dataclasses.asdict(cfg):
        raise ValueError(f"{path} was written by another config ({state.get('config')}), not {cfg}:"
                         " use another --out, or delete the folder to start over")
    return state


def train_tiny_ldm(
    data: ImageSet,
    out_dir: str,
    cfg: TinyLDMConfig,
    *,
    resume: bool = True,
    progress: bool = True,
    stop_after: Optional[int] = None,
    finish: Optional[Callable] = None,
) -> Optional[str]:
    """Train (or resume) the two stages and write ``<out_dir>/pipeline``.

    Args:
        data: training images (sides multiples of 8, e.g. ``size`` x ``size``) and their class names.
        out_dir: run folder: ``checkpoint.pth`` while training, then ``pipeline/``.
        cfg: the run's hyperparameters; a checkpoint of another config is an error.
        resume: continue from ``<out_dir>/checkpoint.pth`` when it exists; False starts over.
        progress: show a tqdm bar (ETA) over both stages.
        stop_after: stop (as if killed) once this many steps of both stages are done and
            checkpointed; returns None. For tests and budgeted runs.
        finish: ``finish(components, out_dir)`` after the pipeline is written (sample grids).

    Returns:
        The pipeline folder, or None when ``stop_after`` stopped the run.

    Raises:
        FloatingPointError: a non-finite loss; the last checkpoint (finite) is kept and no
            pipeline folder is written.
    """
    from .tiny_sd import save_sd_folder, tiny_sd_components

    h, w = data.images.shape[2:]
    if h % 8 or w % 8 or min(h, w) < cfg.vae_crop:
        raise ValueError(f"training images are {h}x{w}: both sides must be multiples of 8 and >= "
                         f"vae_crop ({cfg.vae_crop})")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, pipe_dir = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, PIPELINE)
    comps = tiny_sd_components(seed=cfg.seed, sample_size=cfg.size // 8)
    comps.text_encoder.requires_grad_(False).eval()
    opts = {"vae": torch.optim.AdamW(comps.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0),
            "unet": torch.optim.AdamW(comps.unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)}
    gen = torch.Generator().manual_seed(mixed_seed(cfg.seed, 1))
    stage, step, scaling, losses, seconds = "vae", 0, None, {"vae": [], "unet": []}, 0.0
    if resume and os.path.isfile(ckpt_path):
        state = _load_checkpoint(ckpt_path, cfg)
        comps.vae.load_state_dict(state["vae"])
        comps.unet.load_state_dict(state["unet"])
        opts["vae"].load_state_dict(state["vae_opt"])
        opts["unet"].load_state_dict(state["unet_opt"])
        gen.set_state(state["generator"])
        restore_rng_state(state["rng"])
        stage, step, scaling, losses = state["stage"], state["step"], state["scaling_factor"], state["losses"]
        seconds = state["seconds"]
        if stage == "done" and all(os.path.exists(os.path.join(out_dir, f)) for f in (PIPELINE, SUMMARY)):
            return pipe_dir  # finished before: nothing to redo
    else:  # a fresh run must not leave another run's result behind
        shutil.rmtree(pipe_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, SUMMARY))

    total = cfg.vae_steps + cfg.unet_steps
    done = step + (cfg.vae_steps if stage != "vae" else 0)
    bar = tqdm(total=total, initial=min(done, total), desc="tiny LDM", disable=not progress, dynamic_ncols=True)
    start_time = time.perf_counter()
    embed = PromptEmbeddings(comps.tokenizer, comps.text_encoder)
    latents = None
    for name, steps, module in (("vae", cfg.vae_steps, comps.vae), ("unet", cfg.unet_steps, comps.unet)):
        if stage == "done" or (stage == "unet" and name == "vae"):
            continue
        if name == "unet":
            comps.vae.requires_grad_(False).eval()
            latents = _encode_all(comps.vae, data.images)
            scaling = _latent_scaling(latents)
        module.train()
        while step < steps:
            for group in opts[name].param_groups:
                group["lr"] = _lr(cfg.vae_lr if name == "vae" else cfg.unet_lr, step, steps, cfg.warmup)
            if name == "vae":
                loss = _vae_loss(comps.vae, data, cfg, gen)
            else:
                loss = _unet_loss(comps.unet, comps.scheduler, latents, scaling, data, embed, cfg, gen)
            if not torch.isfinite(loss):
                bar.close()
                raise FloatingPointError(
                    f"tiny LDM: the {name} loss is {loss.item()} at step {step} of {out_dir}; no "
                    f"pipeline written (the last checkpoint, {ckpt_path}, holds finite weights)")
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opts[name].step()
            losses[name].append(loss.item())
            step, done = step + 1, done + 1
            bar.update(1)
            bar.set_postfix(stage=name, loss=f"{losses[name][-1]:.4f}", refresh=False)
            stopping = stop_after is not None and done >= stop_after
            if step % cfg.checkpoint_period == 0 or step == steps or stopping:
                next_stage = ("unet" if name == "vae" else "done") if step == steps else name
                _save(ckpt_path, _state(cfg, next_stage, 0 if step == steps else step, comps, opts, gen,
                                        scaling, losses, seconds + time.perf_counter() - start_time))
            if stopping:
                bar.close()
                return None
        stage, step = ("unet" if name == "vae" else "done"), 0
    bar.close()
    if scaling is None:  # no U-Net steps: still measure the latents for the saved config
        scaling = _latent_scaling(_encode_all(comps.vae.eval(), data.images))
    comps.vae.register_to_config(scaling_factor=scaling)
    comps.vae.eval(), comps.unet.eval()
    for what, module in (("vae", comps.vae), ("unet", comps.unet)):
        check_finite_state(module.state_dict(), f"the trained tiny LDM {what} ({out_dir})")
    tmp_dir = pipe_dir + ".tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    save_sd_folder(comps, tmp_dir)
    if os.path.exists(pipe_dir):
        shutil.rmtree(pipe_dir)
    os.replace(tmp_dir, pipe_dir)
    if finish is not None:
        finish(comps, out_dir)
    _write_summary(out_dir, cfg, scaling, losses, seconds + time.perf_counter() - start_time)
    return pipe_dir


def _save(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def _write_summary(out_dir, cfg, scaling, losses, seconds) -> None:
    def tail(values):  # mean of the last 10% of the steps: a smoothed final loss
        values = values[-max(1, len(values) // 10):]
        return float(np.mean(values)) if values else None

    summary = {"config": dataclasses.asdict(cfg), "scaling_factor": scaling,
               "final_loss": {k: tail(v) for k, v in losses.items()},
               "first_loss": {k: (v[0] if v else None) for k, v in losses.items()},
               "training_seconds": seconds}
    tmp = os.path.join(out_dir, SUMMARY + ".tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, SUMMARY))
