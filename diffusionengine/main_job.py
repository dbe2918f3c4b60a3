"""`make demo-engine`: DiffusionEngine (arXiv 2309.03893) on the embedded synthetic set, on a CPU.

Stages (each writes ``<out>/stages/<name>.json``; a finished stage is reused, a killed one
resumes from its own checkpoints; every stage is seeded):

0. ``tiny_ldm``: train the tiny text-to-image LDM on the TRAIN split (:mod:`.tiny_ldm`).
1. ``adapter_trained`` / ``adapter_random``: the DiffusionDet adapter on the frozen trained
   U-Net, and on the same VAE and text encoder with the U-Net at its initial (random) weights,
   which isolates what the U-Net learned; ``res18_main``: the ResNet-18 main job (reused from
   `make demo` when its ap_table.json is there). Box AP on VAL at every (steps, boxes).
2. ``labels``: label precision / recall at IoU 0.5 for several δ on img2img samples of TRAIN
   references at a limited strength (the reference's boxes are the ground truth).
3. ``generated_set`` (the data engine, tools/generate_dataset.py) and ``mix_<real|gen>_<seed>``:
   ResNet-18 trained on real vs real + generated (DATASETS.GENERATED.DIRS), same iterations.
4. ``timing``: CPU seconds per labelled image; ``generated_labels.png`` (stage 2).

Results: ``<out>/engine_results.json`` and ``<out>/engine_table.md`` (:mod:`.job_report`).
"""
import dataclasses
import json
import logging
import os
import shutil
from typing import Callable, Dict, Optional, Sequence, Tuple

from .job_report import check_results, format_tables
from .tiny_ldm import TinyLDMConfig

__all__ = ["EngineJobSettings", "quick_settings", "run_engine_job"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineJobSettings:
    """What the job runs; a finished stage is reused only under the same settings."""

    out_dir: str = "output/engine"
    ldm: TinyLDMConfig = TinyLDMConfig()
    res18_config: str = "configs/diffdet.synthetic.res18.yaml"
    adapter_config: str = "configs/diffengine.synthetic.tinysd.yaml"
    main_job_dir: str = "output/synthetic_res18"  # `make demo`'s OUTPUT_DIR, reused if finished
    num_images: Optional[Tuple[int, int]] = None  # first TRAIN / VAL synthetic images (None: all)
    opts: Tuple = ()  # config overrides of every detector run
    steps: Tuple[int, ...] = (1, 4)  # sampling steps of the AP rows, as the main job
    boxes: Tuple[int, ...] = (100, 300)
    adapter_iters: int = 600  # the main job's iterations
    deltas: Tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    label_images: int = 160  # TRAIN references of the label precision / recall
    label_strength: float = 0.35  # their img2img encoding ratio
    gen_size: int = 128  # generated images (a multiple of the SD backbone's 64)
    gen_steps: int = 20  # DDIM "leading": the last step is at t = 1, the adapter's
    gen_guidance: float = 4.0
    gen_images: int = 600  # generated training images (as many as the real ones) ...
    gen_min_per_class: int = 500  # ... and at least this many labels per class ...
    gen_max_images: int = 1200  # ... within this many generated images (kept or not)
    gen_strength: Tuple[float, float] = (0.3, 0.8)  # encoding ratios of the generated set
    gen_keep_empty: bool = False  # also keep generated images without a label
    mix_iters: int = 250  # iterations of each real / real + generated training
    mix_seeds: Tuple[int, ...] = (40244023, 1, 2)  # the main job's SEED, then 1, 2
    timing_sizes: Tuple[int, ...] = (128, 256)
    timing_images: int = 4
    batch_size: int = 4  # images per generation call
    seed: int = 0  # references, prompts and generation noise


def quick_settings(out_dir: str) -> EngineJobSettings:
    """A smoke-sized job (tens of seconds): 8 / 4 images at 64 px, a few steps everywhere."""
    small = ("INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MIN_SIZE_TEST", 64,
             "INPUT.MAX_SIZE_TEST", 64, "DATALOADER.NUM_WORKERS", 0, "TEST.IMS_PER_BATCH", 4)
    return EngineJobSettings(
        out_dir=out_dir, ldm=TinyLDMConfig(vae_steps=3, unet_steps=3, batch_size=2, size=64, vae_crop=32),
        main_job_dir="", num_images=(8, 4), opts=small, steps=(1, 2), boxes=(20,), adapter_iters=2,
        label_images=4, gen_size=64, gen_steps=4, gen_images=4, gen_min_per_class=0, gen_max_images=8,
        gen_strength=(0.5, 0.5), gen_keep_empty=True, mix_iters=2, mix_seeds=(40244023, 1), timing_sizes=(64,),
        timing_images=2, batch_size=2)


def _stage(settings: EngineJobSettings, name: str, fn: Callable[[], Dict], key: Dict) -> Dict:
    """``fn()``'s result, computed once: stored in <out>/stages/<name>.json with ``key`` (the
    settings it depends on); another key is an error naming the file."""
    path = os.path.join(settings.out_dir, "stages", f"{name}.json")
    key = json.loads(json.dumps(key))  # tuples -> lists, as stored
    if os.path.isfile(path):
        with open(path) as f:
            stored = json.load(f)
        if stored["key"] != key:
            raise ValueError(f"{path} was computed with other settings ({stored['key']}, now {key}):"
                             " delete it (or the whole output folder) to recompute")
        logger.info("Stage %s: reusing %s", name, path)
        return stored["result"]
    logger.info("Stage %s: running", name)
    result = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "result": result}, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def _data(settings: EngineJobSettings):
    """(train name, val name, opts selecting them, {name: paths}); registers a subset."""
    from diffusiondet.data.datasets import datasets_root, ensure_synthetic_crowd, register_synthetic_crowd

    if settings.num_images is None:
        return "synthetic_crowd_train", "synthetic_crowd_val", [], ensure_synthetic_crowd()
    n_train, n_val = settings.num_images
    train, val = f"synthetic_crowd_train_{n_train}", f"synthetic_crowd_val_{n_val}"
    splits = {train: ("train", n_train), val: ("val", n_val)}
    root = os.path.join(datasets_root(), f"synthetic_crowd_{n_train}_{n_val}")  # as tools/run_main_job.py
    register_synthetic_crowd(root, splits)
    return train, val, ["DATASETS.TRAIN", (train,), "DATASETS.TEST", (val,)], ensure_synthetic_crowd(root, splits)


def run_engine_job(settings: EngineJobSettings, progress: bool = True) -> Dict:
    """Run (or resume) every stage; returns the results written to engine_results.json."""
    from . import job_stages as st

    out = settings.out_dir
    os.makedirs(out, exist_ok=True)
    train_name, val_name, data_opts, paths = _data(settings)
    opts = list(data_opts) + list(settings.opts)
    ldm_key = dataclasses.asdict(settings.ldm) | {"train": train_name}
    ldm = _stage(settings, "tiny_ldm", lambda: st.tiny_ldm(settings, paths[train_name], progress), ldm_key)
    folders = {"trained": ldm["pipeline"], "random": os.path.join(out, "random_unet_pipeline")}
    st.random_unet_folder(ldm["pipeline"], folders["random"], settings.ldm)
    rows_key = {"steps": settings.steps, "boxes": settings.boxes, "opts": repr(opts)}
    adapters = {}
    for kind, folder in folders.items():
        adapter_opts = opts + ["MODEL.DiffusionEngine.SD_PATH", folder, "OUTPUT_DIR",
                               os.path.join(out, f"adapter_{kind}_unet")]
        adapters[kind] = _stage(settings, f"adapter_{kind}", lambda o=adapter_opts: st.detector(
            settings.adapter_config, o, settings.adapter_iters, settings.steps, settings.boxes),
            rows_key | {"ldm": ldm_key, "iters": settings.adapter_iters})
        adapters[kind]["opts"] = adapter_opts
    res18 = _stage(settings, "res18_main", lambda: st.main_job(settings, opts), rows_key)
    label_key = {k: getattr(settings, k) for k in ("deltas", "label_images", "label_strength", "gen_size",
                                                   "gen_steps", "gen_guidance", "seed")} | {"ldm": ldm_key}
    engine_args = (settings.adapter_config, adapters["trained"]["opts"], adapters["trained"]["weights"])
    labels = _stage(settings, "labels", lambda: st.labels(settings, engine_args, paths[train_name], progress),
                    label_key)
    gen_fields = ("gen_images", "gen_min_per_class", "gen_max_images", "gen_strength", "gen_keep_empty")
    gen_key = label_key | {k: getattr(settings, k) for k in gen_fields}
    generated = _stage(settings, "generated_set", lambda: st.generated_set(settings, engine_args, train_name),
                       gen_key)
    st.write_grid(settings, labels, generated, paths[train_name])
    mix = {}
    for seed in settings.mix_seeds:
        for kind, dirs in (("real", ()), ("gen", (generated["folder"],))):
            mix_opts = opts + ["SEED", seed, "DATASETS.GENERATED.DIRS", dirs,
                               "OUTPUT_DIR", os.path.join(out, f"mix_{kind}_seed{seed}")]
            mix[(kind, seed)] = _stage(settings, f"mix_{kind}_{seed}", lambda o=mix_opts: st.detector(
                settings.res18_config, o, settings.mix_iters, (max(settings.steps),), settings.boxes),
                rows_key | {"iters": settings.mix_iters, "gen": gen_key if dirs else None})
    timing = _stage(settings, "timing", lambda: st.timing(settings, engine_args),
                    {k: getattr(settings, k) for k in ("timing_sizes", "timing_images", "gen_steps", "gen_guidance")})
    results = {
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "tiny_ldm": ldm,
        "adapter": {"trained_unet": adapters["trained"]["rows"], "random_unet": adapters["random"]["rows"],
                    "res18_main_job": res18["rows"], "res18_source": res18["source"]},
        "labels": labels,
        "generated_set": generated,
        "real_vs_generated": {kind: [mix[(kind, s)]["rows"] for s in settings.mix_seeds] for kind in ("real", "gen")},
        "timing": timing["rows"],
    }
    check_results(results)
    with open(os.path.join(out, "engine_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = format_tables(results)
    with open(os.path.join(out, "engine_table.md"), "w") as f:
        f.write(table + "\n")
    return results


def restart(out_dir: str) -> None:
    """Delete a previous job's folder (``--restart``)."""
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)


def stage_names(settings: EngineJobSettings) -> Sequence[str]:
    """Names of the stage files the job writes, in order."""
    mix = [f"mix_{k}_{s}" for s in settings.mix_seeds for k in ("real", "gen")]
    return ["tiny_ldm", "adapter_trained", "adapter_random", "res18_main", "labels", "generated_set", *mix, "timing"]
