"""The data engine: generate images with the frozen Stable Diffusion model and label each one with
the detector, from the U-Net features of its own last denoising step.

DiffusionEngine (arXiv 2309.03893, Sec. 3 and "Data scaling-up"; docs/diffusion_engine.md §1.3):
the detection adapter reads the U-Net taps of one pass at t = 1. A generation run whose final
denoising step is at that same t therefore hands the adapter its features for free: the taps of
that last U-Net call (its conditional half under classifier-free guidance) go through the
backbone's channel mapper and the detector's sampler, with ZERO extra U-Net calls.

* Text-to-image (``StableDiffusionPipeline``) for strength 1.0 (pure noise), image-to-image
  (``StableDiffusionImg2ImgPipeline``, the paper's "encoding ratio") for 0 < strength < 1; both
  are built on the backbone's own frozen components (no second copy of the model).
* Schedulers from the SD folder's schedule: "ddim" (DDIMScheduler, "leading" spacing, whose last
  step is t = 1 for any steps and strength, as the public code generates) or "dpmsolver++"
  (DPMSolverMultistepScheduler, the paper's sampler; with "leading" spacing 30 steps end at
  t = 33). A last step other than ``MODEL.DiffusionEngine.TIMESTEP`` is an error unless
  ``allow_timestep_mismatch`` (the adapter would then read features it was not trained on).
* Image i uses its own CPU generator seeded by ``seeds[i]`` (see :func:`generation_seed`), for
  the diffusion noise and for the detector's box noise: an image does not depend on what else
  is in its batch, and a resumed run repeats a one-shot run.

Shape shorthand: B images of one call, (H, W) the image size, M labels of one image; boxes are
abs xyxy pixels of the generated image.
"""
import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.structures import ImageList

from diffusiondet.diffusion import seeded_source

from .labels import filter_labels
from .taps import UNetTaps

__all__ = ["SCHEDULERS", "DataEngine", "GeneratedImage", "TimestepMismatchError", "build_scheduler", "generation_seed"]

SCHEDULERS = ("ddim", "dpmsolver++")


class TimestepMismatchError(ValueError):
    """The last denoising step is not at the timestep the adapter was trained on."""


def generation_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` of a run seeded ``seed``: the first 8 bytes of
    SHA-256("<seed>/<index>") as an integer below 2**63 (independent streams for neighbouring
    indices, the same on every machine and Python)."""
    digest = hashlib.sha256(f"{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def build_scheduler(name: str, config):
    """A generation scheduler from the SD folder's scheduler ``config`` (see the module docstring)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="leading")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")


@dataclass
class GeneratedImage:
    """One generated image, its labels (after ``filter_labels``) and how it was made.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        boxes: (M, 4) float32 abs xyxy; classes (M,) int64 contiguous ids; scores (M,) float32.
        prompt ... reference: the image record fields (``diffusionengine.data.RECORD_FIELDS``);
            ``t`` is the timestep of the last U-Net call (the labelled features), ``reference``
            the name of the img2img reference image (None for text-to-image).
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    prompt: str
    seed: int
    strength: float
    guidance: float
    steps: int
    scheduler: str
    t: int
    reference: Optional[str] = None

    def record(self) -> dict:
        """The fields stored in the image's json record."""
        keys = ("prompt", "seed", "strength", "guidance", "steps", "scheduler", "t", "reference")
        return {k: getattr(self, k) for k in keys}


class DataEngine:
    """Generate and label images with a trained DiffusionEngine detector (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        model,
        timestep: int,
        score_thresh: float = 0.3,
        nms_thresh: float = 0.5,
        min_size: float = 2.0,
        max_per_image: int = 100,
        allowed_classes: Sequence[int] = (),
    ):
        """
        Args:
            model: a DiffusionDet whose backbone is ``StableDiffusionBackbone``, weights loaded.
            timestep: the adapter's feature timestep (``MODEL.DiffusionEngine.TIMESTEP``).
            score_thresh, nms_thresh, min_size, max_per_image, allowed_classes: the labelling
                rules of ``filter_labels`` (allowed_classes: contiguous ids, empty = all).
        """
        backbone = model.backbone
        if not (hasattr(backbone, "components") and hasattr(backbone, "features_from_taps")):
            raise TypeError(f"DataEngine needs a model with the StableDiffusionBackbone, got {type(backbone).__name__}")
        self.model = model.eval()
        self.backbone = backbone
        self.timestep = int(timestep)
        self.label_rules = dict(
            score_thresh=score_thresh, nms_thresh=nms_thresh, min_size=min_size,
            max_per_image=max_per_image, allowed_classes=tuple(allowed_classes),
        )  # fmt: skip

    @classmethod
    def from_config(cls, cfg, model, class_names: Optional[Sequence[str]] = None):
        """``class_names``: the model's classes in contiguous order, needed to map
        ``LABEL_CLASSES``; default: the first training set's ``thing_classes``."""
        e = cfg.MODEL.DiffusionEngine
        allowed = ()
        if e.LABEL_CLASSES:
            if class_names is None:
                from .data.generated import thing_classes_of

                class_names = thing_classes_of(cfg.DATASETS.TRAIN[0])
            unknown = [n for n in e.LABEL_CLASSES if n not in class_names]
            if unknown:
                raise ValueError(
                    f"MODEL.DiffusionEngine.LABEL_CLASSES {unknown} are not among the classes {list(class_names)}"
                )
            allowed = tuple(list(class_names).index(n) for n in e.LABEL_CLASSES)
        return {
            "model": model, "timestep": e.TIMESTEP, "score_thresh": e.LABEL_SCORE_THRESH,
            "nms_thresh": e.LABEL_NMS_THRESH, "min_size": e.LABEL_MIN_SIZE,
            "max_per_image": e.LABEL_MAX_PER_IMAGE, "allowed_classes": allowed,
        }  # fmt: skip

    def pipeline(self, scheduler: str, img2img: bool):
        """A diffusers pipeline on the backbone's frozen components (no copy) with a fresh
        ``scheduler`` of the SD folder's schedule."""
        sd = self.backbone.components
        pipe = sd.pipeline(img2img, build_scheduler(scheduler, sd.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def last_timestep(self, scheduler: str, steps: int) -> int:
        """Timestep of the last denoising step of ``steps`` steps (img2img runs a suffix of the
        same schedule, so its last step is the same)."""
        sched = build_scheduler(scheduler, self.backbone.components.scheduler.config)
        sched.set_timesteps(steps)
        return int(sched.timesteps[-1])

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        refs: Optional[Sequence[np.ndarray]] = None,
        *,
        seeds: Sequence[int],
        strength: float = 1.0,
        guidance: float = 7.5,
        steps: int = 50,
        scheduler: str = "ddim",
        size: Tuple[int, int] = (512, 512),
        negative_prompt: Optional[str] = None,
        ref_names: Optional[Sequence[str]] = None,
        allow_timestep_mismatch: bool = False,
    ) -> List[GeneratedImage]:
        """Generate B = len(prompts) images and label them.

        Args:
            prompts: B text prompts (style suffix included, see ``prompts.with_style``).
            refs: B reference images (H, W, 3) uint8 RGB of ``size`` for image-to-image;
                None (or strength 1.0) for text-to-image.
            seeds: B per-image seeds (e.g. ``generation_seed(run_seed, index)``).
            strength: the encoding ratio in (0, 1]; 1.0 = text-to-image from pure noise.
            guidance: classifier-free guidance scale (> 1 turns it on).
            steps: denoising steps of the full schedule (img2img runs int(steps * strength)).
            scheduler: "ddim" or "dpmsolver++".
            size: (H, W), multiples of the backbone's size divisibility.
            negative_prompt: negative prompt of every image (None: unconditional "").
            ref_names: B names of the references, stored in the records.
            allow_timestep_mismatch: label even when the last step is not at the adapter's t.
        Returns:
            B :class:`GeneratedImage`, in prompt order.
        """
        b, (h, w) = len(prompts), (int(size[0]), int(size[1]))
        img2img = refs is not None and strength < 1.0
        if len(seeds) != b or (refs is not None and len(refs) != b):
            raise ValueError(
                f"prompts, seeds and refs must have one entry per image: {b}, {len(seeds)}, {len(refs or [])}"
            )
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength (encoding ratio) must be in (0, 1], got {strength}: 0 would not denoise at all")
        divisor = self.backbone.size_divisibility
        if h % divisor or w % divisor:
            raise ValueError(f"size {h}x{w} must be a multiple of {divisor} (the backbone's size divisibility)")
        run = max(int(steps * strength), 0) if img2img else steps
        if run < 1:
            raise ValueError(f"strength {strength} x steps {steps} runs no denoising step; raise either")
        last = self.last_timestep(scheduler, steps)
        if last != self.timestep and not allow_timestep_mismatch:
            raise TimestepMismatchError(
                f"the last step of {scheduler!r} with {steps} steps is at t = {last}, but the adapter reads"
                f" features at MODEL.DiffusionEngine.TIMESTEP = {self.timestep}: use 'ddim' (its 'leading'"
                " schedule ends at t = 1), or pass allow_timestep_mismatch (--allow-timestep-mismatch)"
            )
        pipe = self.pipeline(scheduler, img2img)
        args = dict(
            prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
            negative_prompt=[negative_prompt] * b if negative_prompt else None,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds], output_type="np",
        )  # fmt: skip
        if img2img:
            from PIL import Image

            bad = [np.asarray(r).shape for r in refs if np.asarray(r).shape != (h, w, 3)]
            if bad:
                raise ValueError(f"reference images must be ({h}, {w}, 3) uint8 RGB, got {bad[0]}")
            args.update(image=[Image.fromarray(np.asarray(r, dtype=np.uint8)) for r in refs], strength=strength)
        else:
            args.update(height=h, width=w)
        calls = []
        args["callback_on_step_end"] = lambda _pipe, i, t, kwargs: calls.append(int(t)) or kwargs
        # diffusers runs CFG as one [unconditional, conditional] batch when guidance > 1.
        cfg_on = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        with UNetTaps(self.backbone.components.unet, conditional_half=cfg_on) as taps:
            images = pipe(**args).images  # (B, H, W, 3) float in [0, 1]
        t_last = int(torch.as_tensor(taps.timestep).reshape(-1)[0])
        # Zero extra U-Net calls: one per denoising step, the last one at the schedule's end.
        if taps.num_calls != len(calls) or len(calls) != run or t_last != calls[-1] or t_last != last:
            raise RuntimeError(
                f"expected {run} U-Net calls ending at t = {last}, got {taps.num_calls} calls for"
                f" {len(calls)} steps ending at t = {t_last}"
            )
        images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)  # as pipe.numpy_to_pil
        labels = self.label(taps.grouped(), (h, w), seeds)
        return [
            GeneratedImage(
                image=images[i], boxes=boxes, classes=classes, scores=scores, prompt=prompts[i],
                seed=int(seeds[i]), strength=float(strength) if img2img else 1.0, guidance=float(guidance),
                steps=int(steps), scheduler=scheduler, t=t_last,
                reference=(ref_names[i] if ref_names is not None else None) if img2img else None,
            )  # fmt: skip
            for i, (boxes, classes, scores) in enumerate(labels)
        ]

    def label(self, grouped, size: Tuple[int, int], seeds: Sequence[int]):
        """Detections on grouped U-Net taps (latent stride -> (B, C_s, h_s, w_s)) of B images of
        ``size`` -> per image (boxes (M, 4) abs xyxy, classes (M,), scores (M,)) as numpy, after
        ``filter_labels``. The detector's box noise comes from generators seeded by ``seeds``."""
        model, (h, w) = self.model, size
        device = model.device
        feats = self.backbone.features_from_taps({s: x.to(device) for s, x in grouped.items()})
        features = [feats[f].contiguous() for f in model.in_features]
        b = features[0].shape[0]
        images = ImageList(torch.zeros(b, 3, h, w, device=device), [(h, w)] * b)
        whwh = torch.tensor([[w, h, w, h]] * b, dtype=torch.float32, device=device)  # (B, 4)
        inputs = [{"height": h, "width": w} for _ in range(b)]
        rngs = [seeded_source(int(s), "labels") for s in seeds]
        outputs = model.sample_detections(inputs, images, whwh, features, per_image_rng=rngs)
        results = []
        for out in outputs:
            inst = out["instances"].to("cpu")
            kept = filter_labels(inst.pred_boxes.tensor, inst.scores, inst.pred_classes, (h, w), **self.label_rules)
            results.append((kept.boxes.numpy(), kept.classes.numpy(), kept.scores.numpy()))
        return results
