"""``tools/generate_dataset.py``: grow a labelled dataset with the data engine (DiffusionEngine,
arXiv 2309.03893, "Data scaling-up": generate, label with the adapter, keep boxes above δ, stop
when every category has a lower bound of annotations).

    python tools/generate_dataset.py --config-file configs/diffengine.coco.sd2.yaml \\
        --weights output/diffengine/model_final.pth --out datasets/coco_de --num-images 1000 \\
        --captions datasets/coco/annotations/captions_train2017.json --min-per-class 50

Image i of a run seeded S is a pure function of (S, i) and the settings: its diffusion and box
noise come from ``generation_seed(S, i)``, its prompt (and reference image) from a generator
seeded "S/prompt/i"; batch k (images k*B .. k*B+B-1) draws its encoding ratio from "S/strength/k".
The folder's json records how many images were generated (kept or not) and the settings;
``--resume`` continues at the next batch with the same settings, so a resumed run writes the
bytes a one-shot run writes. Only the standard library is imported before the arguments are
parsed (``--help`` never imports diffusers).
"""
import argparse
import json
import logging
import os
import random
import sys

__all__ = ["main", "parse_args", "run"]

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="config of the trained DiffusionEngine adapter")
    p.add_argument("--weights", required=True, help="its trained weights (.pth), loaded with the safe loader")
    p.add_argument("--out", required=True, help="output folder: images/ + annotations.json")
    p.add_argument("--num-images", type=int, required=True, help="images to write (N)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="text file, one prompt per line (used in turn)")
    src.add_argument("--captions", help="COCO captions json: 'realistic photo of <caption>' prompts")
    src.add_argument("--ref-dataset", help="registered dataset: img2img from its images, prompts from their classes")
    p.add_argument("--seed", type=int, default=0, help="run seed S (image i: generation_seed(S, i))")
    p.add_argument("--min-per-class", type=int, default=0, help="keep generating past N until every class has K labels")
    p.add_argument("--max-images", type=int, default=0, help="stop after generating this many images (0: 10 x N)")
    p.add_argument("--strength", type=float, nargs=2, default=(0.3, 1.0), metavar=("A", "B"),
                   help="encoding ratio range for --ref-dataset (paper 0.3-1.0; 1.0 = text-to-image)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the full schedule")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpmsolver++"))
    p.add_argument("--size", type=int, nargs="+", default=[512], metavar="PX", help="H [W] of the images")
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--keep-empty", action="store_true", help="also write images without labels")
    p.add_argument("--allow-timestep-mismatch", action="store_true",
                   help="label even when the last step is not at MODEL.DiffusionEngine.TIMESTEP")
    p.add_argument("--resume", action="store_true", help="continue the dataset in --out")
    p.add_argument("--no-style", action="store_true", help="do not append the paper's positive style suffix")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt (default: diffusionengine.prompts.NEGATIVE_PROMPT; '' for none)")
    p.add_argument("--flush-every", type=int, default=256, help="rewrite the json after this many generated images")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if len(args.size) > 2:
        p.error(f"--size takes H or H W, got {args.size}")
    a, b = args.strength
    if not 0.0 < a <= b <= 1.0:
        p.error(f"--strength needs 0 < A <= B <= 1, got {a} {b}")
    for name in ("num_images", "batch_size", "steps", "flush_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class PromptSource:
    """Image index -> (prompt, reference image (H, W, 3) uint8 RGB or None, reference name)."""

    def __init__(self, args, class_names, size):
        from .prompts import NEGATIVE_PROMPT

        self.args, self.class_names, self.size = args, list(class_names), size
        self.negative = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
        self.lines = self.captions = self.records = None
        if args.prompts:
            with open(args.prompts, encoding="utf-8") as f:
                self.lines = [line.strip() for line in f if line.strip()]
            if not self.lines:
                raise ValueError(f"--prompts {args.prompts}: no prompt in the file")
        elif args.captions:
            with open(args.captions, encoding="utf-8") as f:
                anns = json.load(f).get("annotations") or []
            self.captions = [a["caption"] for a in sorted(anns, key=lambda a: a["id"]) if a.get("caption", "").strip()]
            if not self.captions:
                raise ValueError(f"--captions {args.captions}: no 'annotations' with a caption")
        elif args.ref_dataset:
            from detectron2.data import DatasetCatalog

            self.records = DatasetCatalog.get(args.ref_dataset)
            if not self.records:
                raise ValueError(f"--ref-dataset {args.ref_dataset} has no images")

    def __call__(self, seed: int, index: int):
        from .prompts import caption_prompt, random_class_prompt, with_style

        rng = random.Random(f"{seed}/prompt/{index}")  # str seeds hash with SHA-512: stable
        ref, ref_name = None, None
        if self.lines is not None:
            prompt = self.lines[index % len(self.lines)]
        elif self.captions is not None:
            prompt = caption_prompt(rng.choice(self.captions))
        elif self.records is not None:
            record = self.records[rng.randrange(len(self.records))]
            present = sorted({a["category_id"] for a in record.get("annotations", [])})
            names = [self.class_names[c] for c in present] or self.class_names
            prompt = random_class_prompt(names, rng)
            ref, ref_name = self._reference(record["file_name"], rng), os.path.basename(record["file_name"])
        else:
            prompt = random_class_prompt(self.class_names, rng)
        return (prompt if self.args.no_style else with_style(prompt)), ref, ref_name

    def _reference(self, file_name, rng):
        """The reference resized to cover (H, W) keeping its aspect ratio, then a random (H, W)
        crop (the paper resizes and crops references likewise)."""
        import cv2

        from diffusiondet.data.image_io import read_image

        image = read_image(file_name, "RGB")
        (h, w), (ih, iw) = self.size, image.shape[:2]
        scale = max(h / ih, w / iw)
        rh, rw = max(h, round(ih * scale)), max(w, round(iw * scale))
        image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        y, x = rng.randint(0, rh - h), rng.randint(0, rw - w)
        return image[y : y + h, x : x + w].copy()


def _settings(args, size):
    """What a resumed run must share with the run it continues."""
    source = {"prompts": args.prompts, "captions": args.captions, "ref_dataset": args.ref_dataset}
    return {
        "seed": args.seed, "batch_size": args.batch_size, "strength": list(args.strength),
        "guidance": args.guidance, "steps": args.steps, "scheduler": args.scheduler, "size": list(size),
        "source": source, "style": not args.no_style, "negative_prompt": args.negative_prompt,
        "keep_empty": args.keep_empty, "weights": os.path.abspath(args.weights),
    }  # fmt: skip


def _generate_batch(engine, source, args, size, first: int):
    """Images first .. first + batch_size - 1 of the run (batch k = first // batch_size)."""
    from .engine import generation_seed

    indices = range(first, first + args.batch_size)
    drawn = [source(args.seed, i) for i in indices]  # (prompt, reference or None, its name)
    refs = [d[1] for d in drawn] if args.ref_dataset else None
    lo, hi = args.strength
    strength = random.Random(f"{args.seed}/strength/{first // args.batch_size}").uniform(lo, hi) if refs else 1.0
    return engine.generate(
        [d[0] for d in drawn], refs, seeds=[generation_seed(args.seed, i) for i in indices], strength=strength,
        guidance=args.guidance, steps=args.steps, scheduler=args.scheduler, size=size,
        negative_prompt=source.negative or None, ref_names=[d[2] for d in drawn] if refs else None,
        allow_timestep_mismatch=args.allow_timestep_mismatch,
    )  # fmt: skip


def _open_writer(args, categories, settings, reference):
    from .data.coco_writer import GeneratedCocoWriter

    writer = GeneratedCocoWriter(args.out, categories, resume=args.resume)
    old = writer.info.get("settings", settings)
    if old != settings:
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(f"--resume of {args.out} with other settings: {changed} (was {[old.get(k) for k in changed]})")
    writer.info.update(settings=settings, reference_dataset=reference)
    return writer


def run(args) -> int:
    """Generate into ``args.out``; returns the exit status (1: --max-images reached first)."""
    import torch
    from detectron2.modeling import build_model
    from tqdm import tqdm

    from diffusiondet.engine.checkpoint import load_model_weights

    from .config import build_config
    from .data.coco_writer import reference_categories
    from .engine import DataEngine

    cfg = build_config(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    reference = args.ref_dataset or cfg.DATASETS.TRAIN[0]
    categories = reference_categories(reference)  # same ids and names: no remap when training
    class_names = [c["name"] for c in categories]
    if len(class_names) != cfg.MODEL.DiffusionDet.NUM_CLASSES:
        raise ValueError(
            f"the reference dataset '{reference}' has {len(class_names)} categories but the model"
            f" (MODEL.DiffusionDet.NUM_CLASSES) predicts {cfg.MODEL.DiffusionDet.NUM_CLASSES}"
        )
    size = (args.size[0], args.size[-1])
    writer = _open_writer(args, categories, _settings(args, size), reference)
    attempts = int(writer.info.get("attempts", 0))  # images generated so far, kept or not
    model = build_model(cfg)
    load_model_weights(model, cfg, args.weights)
    engine = DataEngine(cfg, model, class_names=class_names)
    source = PromptSource(args, class_names, size)
    max_images = args.max_images or 10 * args.num_images
    # The lower bound applies to the classes that may label an image (LABEL_CLASSES, or all).
    wanted = engine.label_rules["allowed_classes"] or range(len(class_names))
    done = lambda: writer.num_images >= args.num_images and min(writer.class_counts[c] for c in wanted) >= args.min_per_class  # noqa: E731
    bar, since_flush, status = tqdm(total=args.num_images, initial=min(writer.num_images, args.num_images)), 0, 0
    with torch.no_grad():
        while not done():
            if attempts >= max_images:
                short = {class_names[i]: writer.class_counts[i] for i in wanted if writer.class_counts[i] < args.min_per_class}
                print(f"stopped: --max-images {max_images} images generated; {writer.num_images} written"
                      f" (of {args.num_images}); classes below {args.min_per_class} labels: {short}",
                      file=sys.stderr)  # fmt: skip
                status = 1
                break
            generated = _generate_batch(engine, source, args, size, attempts)
            attempts += len(generated)
            for g in generated:
                if done():
                    break  # the rest of a batch is not written (a resumed run goes on at the next batch)
                if len(g.boxes) or args.keep_empty:
                    writer.add(g.image, g.boxes, g.classes, g.scores, **g.record())
                    bar.update(int(writer.num_images <= args.num_images))
            writer.info["attempts"] = attempts
            since_flush += len(generated)
            if since_flush >= args.flush_every:
                writer.flush()
                since_flush = 0
    writer.info["attempts"] = attempts
    writer.flush()
    bar.close()
    counts = dict(zip(class_names, writer.class_counts))
    logger.info("%s: %d images (%d generated), labels per class %s", writer.json_path, writer.num_images, attempts, counts)
    return status


def main(argv=None) -> int:
    args = parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="diffusionengine")
    return run(args)
