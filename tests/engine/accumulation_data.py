"""A Trainer on fixed in-memory micro-batches, for the gradient accumulation tests.

The micro-batches have different numbers of GT boxes, so that the criterion's normaliser (the
positive queries of each stage, diffusiondet/modeling/criterion.py) differs between them. The
model's box noise is drawn per image from a generator seeded by that image's boxes: the draws do
not depend on how images are grouped into batches, micro-batches or processes.
"""
import torch

from detectron2.utils import comm

from diffusiondet.diffusion.random_source import TorchRandom
from diffusiondet.engine import Trainer
from tests.utils import random_input, tiny_cfg

# GT boxes of the two images of each micro-batch.
BOX_COUNTS = [(1, 5), (3, 7), (2, 2), (6, 1)]
# One non-square size for all: GroupNorm statistics include the padding, which depends on the
# largest image of a batch, so mixed sizes would make a batch of 4 differ from 2 + 2 by padding.
HEIGHT, WIDTH = 64, 88


def images():
    """The 8 images of the 4 micro-batches, in order."""
    return [
        random_input(HEIGHT, WIDTH, n, num_classes=3, seed=10 * i + j)
        for i, counts in enumerate(BOX_COUNTS) for j, n in enumerate(counts)
    ]  # fmt: skip


class CyclingLoader:
    """Yields ``batches`` in a cycle and counts the batches taken (``taken``)."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        while True:
            for batch in self.batches:
                self.taken += 1
                yield batch


def _noise_seed(target) -> int:
    return int(target["boxes_xyxy"].sum().item() * 100)


def noise_per_image(model) -> None:
    """Make ``model.corrupt_targets`` draw each image's noise from its own seeded generator."""
    corrupt = model.corrupt_targets

    def per_image(targets, whwh, rng=None):
        parts = [
            corrupt([t], size[None], TorchRandom(generator=torch.Generator().manual_seed(_noise_seed(t))))
            for t, size in zip(targets, whwh)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    model.corrupt_targets = per_image


class FixedDataTrainer(Trainer):
    """Trainer on :func:`images`: batches of IMS_PER_BATCH / world images in order; process r of
    w takes batches r, r + w, ... (as a sharded stream would)."""

    @classmethod
    def build_train_loader(cls, cfg):
        per_process = cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        all_images = images()
        batches = [all_images[i:i + per_process] for i in range(0, len(all_images), per_process)]
        return CyclingLoader(batches[comm.get_rank()::comm.get_world_size()])

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        noise_per_image(model)
        return model


def fixed_cfg(output_dir, ims_per_batch, accumulate_steps, *extra):
    """One step of plain SGD (no momentum, decay or clipping: the update is -lr * gradient)."""
    cfg = tiny_cfg(
        "DATASETS.TEST", (), "SEED", 3, "OUTPUT_DIR", str(output_dir),
        "SOLVER.IMS_PER_BATCH", ims_per_batch, "SOLVER.ACCUMULATE_STEPS", accumulate_steps,
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.0, "SOLVER.WEIGHT_DECAY", 0.0,
        "SOLVER.BASE_LR", 0.05, "SOLVER.CLIP_GRADIENTS.ENABLED", False,
        "SOLVER.MAX_ITER", 1, "SOLVER.CHECKPOINT_PERIOD", 1000, *extra,
    )  # fmt: skip
    cfg.freeze()
    return cfg


def state(model) -> dict:
    """Detached copies of the (DDP-unwrapped) model's tensors."""
    model = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
