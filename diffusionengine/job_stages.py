"""The stages of the DiffusionEngine demo job (:mod:`diffusionengine.main_job`), one function
each; every one returns a json-able dict (the stage's stored result) and resumes from its own
checkpoints when it was killed.
"""
import json
import logging
import os
import shutil
from typing import Dict, Sequence

import numpy as np
from tqdm import tqdm

from .job_detectors import scaled_schedule, train_and_evaluate
from .job_labels import (LabelledSample, label_references, load_references, precision_recall,
                         time_labelled_images, write_label_grid)

__all__ = ["detector", "generated_set", "labels", "main_job", "random_unet_folder", "timing", "tiny_ldm",
           "write_grid"]

logger = logging.getLogger(__name__)

_GRID_SAMPLES = "label_samples.npz"  # labelled img2img samples kept for generated_labels.png
_GRID_COLUMNS = 4


def tiny_ldm(settings, train_paths: Dict[str, str], progress: bool) -> Dict:
    """Stage 0: the tiny LDM on the TRAIN images (resumes its checkpoint)."""
    from diffusiondet.data.synthetic import SYNTHETIC_CROWD_CLASSES

    from .tiny_ldm import train_tiny_ldm
    from .tiny_ldm_data import load_coco_images
    from .tiny_ldm_samples import write_samples

    data = load_coco_images(train_paths["json_file"], train_paths["image_root"], settings.ldm.size)
    out = os.path.join(settings.out_dir, "tiny_ldm")

    def finish(components, out_dir):
        write_samples(components, out_dir, SYNTHETIC_CROWD_CLASSES, references=data.images[:4], seed=settings.ldm.seed)

    pipeline = train_tiny_ldm(data, out, settings.ldm, progress=progress, finish=finish)
    with open(os.path.join(out, "summary.json")) as f:
        return {"pipeline": pipeline, "samples": os.path.join(out, "samples.png"), "summary": json.load(f)}


def random_unet_folder(trained: str, folder: str, ldm_cfg) -> str:
    """The trained folder with its U-Net replaced by the U-Net's initial weights (the same
    seeded init the training started from): same VAE (and scaling factor) and text encoder."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    from .local_sd import load_local_sd
    from .tiny_sd import save_sd_folder, tiny_sd_components

    components = load_local_sd(trained)
    components.unet = tiny_sd_components(seed=ldm_cfg.seed, sample_size=ldm_cfg.size // 8).unet
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_sd_folder(components, tmp)
    os.replace(tmp, folder)
    return folder


def detector(config_file: str, opts: Sequence, iters: int, steps: Sequence[int], boxes: Sequence[int]) -> Dict:
    """Train ``config_file`` for ``iters`` iterations (its schedule scaled) and evaluate it."""
    return train_and_evaluate(config_file, list(opts) + scaled_schedule(config_file, iters), steps, boxes)


def main_job(settings, opts: Sequence) -> Dict:
    """The ResNet-18 main job's rows: `make demo`'s ap_table.json when it holds the config's SEED
    and every (steps, boxes); otherwise trained here for the adapters' iterations."""
    from .config import build_config

    seed = build_config(settings.res18_config).SEED
    wanted = {(s, b) for s in settings.steps for b in settings.boxes}
    for folder in ((settings.main_job_dir, os.path.join(settings.main_job_dir, f"seed_{seed}"))
                   if settings.main_job_dir else ()):
        path = os.path.join(folder, "ap_table.json")
        if os.path.isfile(path):
            with open(path) as f:
                table = json.load(f)
            rows = [r for r in table["rows"] if (r["steps"], r["boxes"]) in wanted]
            if table.get("seed") == seed and len(rows) == len(wanted):
                return {"rows": rows, "source": path}
    run = detector(settings.res18_config, list(opts) + ["OUTPUT_DIR", os.path.join(settings.out_dir, "res18_main")],
                   settings.adapter_iters, settings.steps, settings.boxes)
    return {"rows": run["rows"], "source": f"trained here ({settings.adapter_iters} iterations)"}


def _engine(engine_args, score_thresh: float):
    """The data engine on the trained adapter (weights loaded safely), labelling above score_thresh."""
    from diffusiondet.engine import Trainer, load_model_weights

    from .config import build_config
    from .engine import DataEngine

    config_file, opts, weights = engine_args
    cfg = build_config(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    model = Trainer.build_model(cfg)
    load_model_weights(model, cfg)
    e = cfg.MODEL.DiffusionEngine
    return DataEngine(model=model, timestep=e.TIMESTEP, score_thresh=score_thresh, nms_thresh=e.LABEL_NMS_THRESH,
                      min_size=e.LABEL_MIN_SIZE, max_per_image=e.LABEL_MAX_PER_IMAGE)


def _generation(settings) -> Dict:
    return {"guidance": settings.gen_guidance, "steps": settings.gen_steps, "scheduler": "ddim"}


def labels(settings, engine_args, train_paths: Dict[str, str], progress: bool) -> Dict:
    """Stage 2: label precision / recall per δ on img2img samples of TRAIN references."""
    from .engine import generation_seed

    engine = _engine(engine_args, min(settings.deltas))
    refs = load_references(train_paths["json_file"], train_paths["image_root"], settings.label_images,
                           settings.gen_size, settings.seed)
    seeds = [generation_seed(settings.seed, i) for i in range(len(refs.images))]
    bar = tqdm(total=len(refs.images), desc="labels (img2img)", disable=not progress, dynamic_ncols=True)
    generated, real = label_references(engine, refs, strength=settings.label_strength, seeds=seeds,
                                       batch_size=settings.batch_size, progress=bar, **_generation(settings))
    bar.close()
    keep = {f"{kind}_{field}_{i}": getattr(s, field) for kind, samples in (("gen", generated), ("real", real))
            for i, s in enumerate(samples[:_GRID_COLUMNS])
            for field in ("image", "boxes", "classes", "scores", "gt_boxes", "gt_classes")}
    np.savez_compressed(os.path.join(settings.out_dir, _GRID_SAMPLES), **keep)
    return {"generated": precision_recall(generated, settings.deltas),
            "real_references": precision_recall(real, settings.deltas),
            "images": len(refs.images), "strength": settings.label_strength, "size": settings.gen_size,
            "class_names": refs.class_names,
            "ground_truth": "img2img from annotated TRAIN references at strength "
                            f"{settings.label_strength}: the image keeps its objects, so the reference's"
                            " boxes are the ground truth"}


def generated_set(settings, engine_args, train_name: str) -> Dict:
    """Stage 3a: the data engine's generated training set (tools/generate_dataset.py's code),
    img2img from TRAIN references at strengths in ``gen_strength``; resumes a killed run."""
    from .data.coco_writer import ANNOTATIONS_FILE
    from .generate_cli import main as generate

    config_file, opts, weights = engine_args
    folder = os.path.join(settings.out_dir, "generated")
    a, b = settings.gen_strength
    argv = ["--config-file", config_file, "--weights", weights, "--out", folder,
            "--num-images", str(settings.gen_images), "--min-per-class", str(settings.gen_min_per_class),
            "--max-images", str(settings.gen_max_images),
            "--ref-dataset", train_name, "--strength", str(a), str(b), "--size", str(settings.gen_size),
            "--guidance", str(settings.gen_guidance), "--steps", str(settings.gen_steps),
            "--batch-size", str(settings.batch_size), "--seed", str(settings.seed),
            # The tiny LDM was trained on bare class prompts with "" as the unconditional one.
            "--no-style", "--negative-prompt", ""] + (["--keep-empty"] if settings.gen_keep_empty else [])
    if os.path.isfile(os.path.join(folder, ANNOTATIONS_FILE)):
        argv.append("--resume")
    status = generate(argv + ["--opts", *[str(o) for o in opts]])
    with open(os.path.join(folder, ANNOTATIONS_FILE)) as f:
        coco = json.load(f)
    if not coco["images"]:
        raise ValueError(f"the data engine kept no image in {folder} (none had a label above"
                         " MODEL.DiffusionEngine.LABEL_SCORE_THRESH): the adapter detects nothing on generated images")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = {n: 0 for n in names.values()}
    for ann in coco["annotations"]:
        per_class[names[ann["category_id"]]] += 1
    return {"folder": folder, "images": len(coco["images"]), "labels_per_class": per_class,
            "attempts": coco.get("info", {}).get("attempts"), "reached_max_images": status == 1,
            "strength": [a, b]}


def write_grid(settings, labels_result: Dict, generated: Dict, train_paths: Dict[str, str]) -> str:
    """``<out>/generated_labels.png`` from the stage-2 samples and the generated set's first images."""
    import cv2

    path = os.path.join(settings.out_dir, "generated_labels.png")
    stored = np.load(os.path.join(settings.out_dir, _GRID_SAMPLES))
    fields = ("image", "boxes", "classes", "scores", "gt_boxes", "gt_classes")
    count = sum(1 for k in stored.files if k.startswith("gen_image_"))
    samples = {kind: [LabelledSample(*(stored[f"{kind}_{f}_{i}"] for f in fields)) for i in range(count)]
               for kind in ("gen", "real")}
    with open(os.path.join(generated["folder"], "annotations.json")) as f:
        coco = json.load(f)
    contiguous = {c["id"]: k for k, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    extra = []
    for im in coco["images"][:_GRID_COLUMNS]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        image = cv2.imread(os.path.join(generated["folder"], "images", im["file_name"]))[:, :, ::-1]
        extra.append(LabelledSample(image, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                    np.array([contiguous[a["category_id"]] for a in anns]),
                                    np.array([a.get("score", 1.0) for a in anns]), np.zeros((0, 4)), np.zeros(0)))
    delta = 0.3 if 0.3 in settings.deltas else settings.deltas[0]  # the paper's δ
    write_label_grid(path, samples["gen"], samples["real"], labels_result["class_names"], delta, extra,
                     caption=f" (strength {settings.label_strength})")
    return path


def timing(settings, engine_args) -> Dict:
    """Stage 4: CPU seconds per labelled text-to-image sample at each size."""
    from .engine import generation_seed
    from .prompts import class_prompt

    engine = _engine(engine_args, 0.3)
    classes = load_class_names(engine_args)
    n = settings.timing_images
    prompts = [class_prompt([classes[i % len(classes)]]) for i in range(n)]
    seeds = [generation_seed(settings.seed + 1, i) for i in range(n)]
    return {"rows": [time_labelled_images(engine, prompts, size, seeds, **_generation(settings))
                     for size in settings.timing_sizes]}


def load_class_names(engine_args) -> list:
    """The adapter's training classes, in contiguous order."""
    from .config import build_config
    from .data.generated import thing_classes_of

    return thing_classes_of(build_config(engine_args[0], list(engine_args[1])).DATASETS.TRAIN[0])
