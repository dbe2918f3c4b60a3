"""Load a Stable Diffusion 1.x / 2.x model from a local diffusers folder, and nothing else.

DiffusionEngine (arXiv 2309.03893, "Implementation Details") uses a frozen SD v2. This loader
takes the folder that ``StableDiffusionPipeline.save_pretrained`` (or a hub snapshot) writes::

    <path>/model_index.json
    <path>/unet/          config.json + diffusion_pytorch_model.safetensors
    <path>/vae/           config.json + diffusion_pytorch_model.safetensors
    <path>/text_encoder/  config.json + model.safetensors
    <path>/tokenizer/     vocab.json, merges.txt, ...
    <path>/scheduler/     scheduler_config.json

Rules: a hub id is never downloaded (nothing here touches the network); weights load from
safetensors only, so a file from elsewhere never runs code (a folder with only ``.bin`` /
``.pt`` pickles is refused); each component is loaded by its own class, never by the class
names written in the folder. The scheduler is always a ``DDIMScheduler`` built from the
folder's schedule (as the public DiffusionEngine code loads it): its ``add_noise`` is the
forward process of the feature pass, whatever sampler the folder ships for generation.
"""
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

__all__ = ["EXPECTED_LAYOUT", "LocalSDError", "SDComponents", "load_local_sd"]

# (entry, what it holds): the layout load_local_sd requires, listed in its errors.
EXPECTED_LAYOUT = (
    ("model_index.json", "file"),
    ("unet", "folder with config.json + *.safetensors"),
    ("vae", "folder with config.json + *.safetensors"),
    ("text_encoder", "folder with config.json + *.safetensors"),
    ("tokenizer", "folder"),
    ("scheduler", "folder with scheduler_config.json"),
)
_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class LocalSDError(FileNotFoundError):
    """``path`` is not a usable local Stable Diffusion folder (the message says why)."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model that DiffusionEngine uses.

    Attributes:
        vae: ``AutoencoderKL`` (pixels in [-1, 1] <-> latents / ``scaling_factor``).
        unet: ``UNet2DConditionModel`` (the feature extractor).
        text_encoder: ``CLIPTextModel``.
        tokenizer: ``CLIPTokenizer``.
        scheduler: ``DDIMScheduler`` of the model's training schedule.
        path: the folder it was loaded from ("" when built in memory).
    """

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    path: str = ""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 2 ** (VAE levels - 1), as diffusers' pipelines compute it."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def frozen_modules(self) -> Dict[str, torch.nn.Module]:
        """The networks (not tokenizer / scheduler), by name."""
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}

    def pipeline(self, img2img: bool = False, scheduler=None):
        """A diffusers ``StableDiffusionPipeline`` (``StableDiffusionImg2ImgPipeline`` with
        ``img2img``) on these very modules (no copy), with ``scheduler`` or the model's own;
        no safety checker (nothing here is shown to a user as is)."""
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
        return cls(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip


def _layout_text() -> str:
    return "\n".join(f"    {name:<18} {what}" for name, what in EXPECTED_LAYOUT)


def _fail(path: str, problem: str) -> LocalSDError:
    return LocalSDError(
        f"{path!r}: {problem}. Expected a local diffusers Stable Diffusion folder "
        f"(StableDiffusionPipeline.save_pretrained) with:\n{_layout_text()}\n"
        "Hub ids are not downloaded: download the model once, then give its folder."
    )


def _check_folder(path: str) -> None:
    """Raise ``LocalSDError`` unless ``path`` has the expected layout and safetensors weights."""
    if not os.path.isdir(path):
        hint = " (this looks like a hub id)" if "/" in path and not os.path.isabs(path) else ""
        raise _fail(path, f"no such local folder{hint}")
    missing = [
        name for name, what in EXPECTED_LAYOUT
        if not (os.path.isfile if what == "file" else os.path.isdir)(os.path.join(path, name))
    ]  # fmt: skip
    if missing:
        raise _fail(path, f"missing {', '.join(missing)}")
    for folder in _WEIGHT_FOLDERS:
        files = sorted(os.listdir(os.path.join(path, folder)))
        if any(f.endswith(".safetensors") for f in files):
            continue
        pickles: List[str] = [os.path.join(path, folder, f) for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise LocalSDError(
                f"{pickles[0]}: weights stored as a pickle are refused (loading one can run code);"
                f" {os.path.join(path, folder)!r} needs *.safetensors weights (convert the model"
                " with save_pretrained(..., safe_serialization=True) where you trust it)"
            )
        raise _fail(path, f"no *.safetensors weights in {folder}/")


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 / TRANSFORMERS_OFFLINE=1 for the duration, restored afterwards: a second
    guard besides ``local_files_only`` should a loader still try the hub."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_local_sd(path: str, *, torch_dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load the SD model saved in the local folder ``path`` (see the module docstring).

    Args:
        path: a local diffusers Stable Diffusion folder (SD 1.x or 2.x).
        torch_dtype: dtype of the VAE, U-Net and text encoder.
    Returns:
        ``SDComponents`` on the CPU, networks in eval mode.
    Raises:
        LocalSDError (a FileNotFoundError): a hub id, a missing folder, a folder without the
        expected layout, or weights that are pickles only; the message names the path.
    """
    path = os.fspath(path)
    _check_folder(path)
    with _hub_offline():
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as transformers_logging

        # A "Loading weights" bar per text encoder would interleave with our own progress bars.
        bar_was_on = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()

        # low_cpu_mem_usage=False: the same loading, without diffusers asking for `accelerate`.
        common = {
            "local_files_only": True, "use_safetensors": True, "torch_dtype": torch_dtype,
            "low_cpu_mem_usage": False,
        }  # fmt: skip
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
        text_encoder = CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", local_files_only=True, use_safetensors=True, dtype=torch_dtype
        )
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    return SDComponents(
        vae=vae.eval(),
        unet=unet.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        path=path,
    )
