"""Run one of the paper's ablations (diffusiondet/tooling/ablation_studies.py) on the synthetic set:
train its models (the study recipe, several seeds), evaluate them with the flexibility sweep, and
collect each arm's numbers over seeds (tools/ablate.py; results in docs/ablations.md).

Everything lands under one output folder, shared by the studies, so that a model two studies need
(the recipe's own model, e.g. 4a's signal scale 2.0 = 4b's Cat Gaussian = 5's 100 boxes) is
trained once::

    <output>/recipe.json                       the training recipe the models were made with
    <output>/models/<arm>/seed_<S>/            a training (checkpoints, model_final.pth)
    <output>/models/<arm>/seed_<S>/eval_<e>/   its evaluations (sweep_results.json)
    <output>/study_<name>/                     the study's table.md, table.csv, plot.png, results.json

Nothing finished is redone: a training resumes from its last checkpoint (to the same weights, the
runs are seeded) and finished evaluations are read back, so a killed study resumes where it stopped.
"""
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog

from ..config import build_config
from ..data.datasets import ensure_synthetic_crowd, register_synthetic_crowd
from ..engine import Trainer, load_model_weights
from ..evaluation.sweep import Combination, run_sweep
from ..utils.progress import progress_bar
from .ablation_studies import MAIN_JOB_SEEDS, RECIPE, Arm, Study
from .main_job import data_selection, train

__all__ = ["MAIN_JOB_CONFIG", "StudyRun", "arm_values", "model_dir", "run_study"]

logger = logging.getLogger(__name__)

MAIN_JOB_CONFIG = "configs/diffdet.synthetic.res18.yaml"


@dataclass
class StudyRun:
    """What to run: ``study`` (only the ``arms`` named, default all) with training ``seeds``
    (default the study's number of MAIN_JOB_SEEDS), the training ``recipe`` overrides, extra
    config overrides ``opts`` (e.g. a tiny model for a test) and the synthetic ``num_images``
    (TRAIN, VAL; default the whole set)."""

    study: Study
    output_dir: str = "output/ablations"
    seeds: Optional[Sequence[int]] = None
    arms: Optional[Sequence[str]] = None
    recipe: Sequence = RECIPE
    opts: Sequence = ()
    num_images: Optional[Tuple[int, int]] = None
    config_file: str = MAIN_JOB_CONFIG
    progress: Optional[bool] = None
    _data: Tuple = field(default=(None, None, []), repr=False)

    def selected_arms(self) -> List[Arm]:
        return [self.study.arm(n) for n in self.arms] if self.arms else list(self.study.arms)

    def training_seeds(self) -> List[int]:
        seeds = list(self.seeds) if self.seeds else list(MAIN_JOB_SEEDS[: self.study.seeds])
        return seeds[:1] if self.study.single_model else seeds

    def models(self, arm: Arm) -> List[Tuple[Tuple, int]]:
        """(training overrides, seed) of the models behind ``arm``'s numbers."""
        train_opts = () if self.study.single_model else tuple(arm.train)
        return [(train_opts, seed) for seed in self.training_seeds()]

    def sampling_seeds(self, seed: int) -> List[int]:
        return [seed + i for i in range(self.study.sampling_seeds)]

    def base_opts(self) -> List:
        return [*self.recipe, *self._data[2], *self.opts]

    def config(self, train_opts: Sequence, seed: int, eval_opts: Sequence = ()):
        out = model_dir(self.output_dir, train_opts, seed)
        return build_config(self.config_file, [*self.base_opts(), *train_opts, *eval_opts, "SEED", seed, "OUTPUT_DIR", out])


def _slug(opts: Sequence) -> str:
    """A folder name for config overrides: "default" for none, else KEY=VALUE joined by '_'
    (last key component; characters outside [A-Za-z0-9.=-] dropped)."""
    if not opts:
        return "default"
    pairs = [f"{str(k).rsplit('.', 1)[-1]}={v}" for k, v in zip(opts[::2], opts[1::2])]
    return re.sub(r"[^A-Za-z0-9.=_-]", "", "_".join(pairs))


def model_dir(output_dir: str, train_opts: Sequence, seed: int) -> str:
    return os.path.join(output_dir, "models", _slug(train_opts), f"seed_{seed}")


def _check_recipe(run: StudyRun) -> None:
    """The output folder holds models of one recipe: record it at the first run, refuse another."""
    os.makedirs(run.output_dir, exist_ok=True)
    path = os.path.join(run.output_dir, "recipe.json")
    recipe = json.loads(json.dumps({"config_file": run.config_file, "opts": run.base_opts()}))
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != recipe:
            raise ValueError(f"{run.output_dir} holds models of another recipe ({path}: {recorded}); "
                             f"this run's is {recipe}. Use another --output-dir.")
        return
    with open(path + ".tmp", "w") as f:
        json.dump(recipe, f, indent=1)
    os.replace(path + ".tmp", path)


def _evaluation_groups(run: StudyRun) -> Dict[Tuple, set]:
    """{(training overrides, seed, evaluation overrides): {Combination}}: every evaluation the
    selected arms need, one sweep per model and evaluation setting."""
    groups: Dict[Tuple, set] = {}
    for arm in run.selected_arms():
        for train_opts, seed in run.models(arm):
            combos = groups.setdefault((train_opts, seed, tuple(arm.evaluate)), set())
            for _, steps, boxes in run.study.cells(arm):
                combos.update(Combination(steps, boxes, s) for s in run.sampling_seeds(seed))
    return groups


def _evaluate(run: StudyRun, train_opts, seed, eval_opts, combos) -> Dict[str, dict]:
    cfg = run.config(train_opts, seed, eval_opts)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    cfg.freeze()
    out = os.path.join(cfg.OUTPUT_DIR, "eval_" + _slug(eval_opts))
    dataset = cfg.DATASETS.TEST[0]
    todo = sorted(combos, key=lambda c: (c.steps, c.boxes, c.seed))
    path = os.path.join(out, "sweep_results.json")
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
        if all(c.key in done for c in todo):
            return done
    model = Trainer.build_model(cfg).eval()
    load_model_weights(model, cfg)  # safe unpickling, shapes, finite values
    loader = Trainer.build_test_loader(cfg, dataset)

    def evaluator(c):
        return Trainer.build_evaluator(cfg, dataset, os.path.join(out, c.key))

    return run_sweep(model, loader, evaluator, todo, out, progress=False)


def arm_values(run: StudyRun, arm: Arm, evaluations: Dict[Tuple, Dict[str, dict]], num_images: int):
    """{column label: [value per (training seed, sampling seed)]} of ``arm``'s row."""
    values = {}
    for column, steps, boxes in run.study.cells(arm):
        cell = []
        for train_opts, seed in run.models(arm):
            done = evaluations[(train_opts, seed, tuple(arm.evaluate))]
            for s in run.sampling_seeds(seed):
                entry = done[Combination(steps, boxes, s).key]
                if column.metric == "images/s":
                    seconds = entry["seconds"]["backbone_shared"] + entry["seconds"]["sampling"]
                    cell.append(num_images / seconds)
                else:
                    cell.append(entry["results"]["bbox"][column.metric])
        values[column.label] = cell
    return values


def run_study(run: StudyRun) -> List[Dict]:
    """Train and evaluate what ``run`` needs (skipping what is done) and return one row per arm:
    {"arm", "default", "values": {column: [...]}, "paper": {column: value}}."""
    root, splits, data_opts = data_selection(run.num_images)
    run._data = (root, splits, data_opts)
    _check_recipe(run)
    if splits is not None:
        register_synthetic_crowd(root, splits)
    ensure_synthetic_crowd(root, splits)
    groups = _evaluation_groups(run)
    models = list(dict.fromkeys((t, s) for t, s, _ in groups))
    jobs = [("train", m, None) for m in models] + [("evaluate", (t, s), e) for t, s, e in groups]
    jobs.sort(key=lambda j: models.index(j[1]))  # each model's evaluations right after its training
    evaluations = {}
    bar = progress_bar(jobs, desc=f"study {run.study.name}", unit="run", enabled=run.progress)
    for kind, (train_opts, seed), eval_opts in bar:
        bar.set_postfix_str(f"{kind} {_slug(train_opts)} seed {seed}" + (f" {_slug(eval_opts)}" if eval_opts else ""))
        if kind == "train":
            train(run.config(train_opts, seed))
        else:
            evaluations[(train_opts, seed, eval_opts)] = _evaluate(run, train_opts, seed, eval_opts,
                                                                   groups[(train_opts, seed, eval_opts)])
    dataset = run.config(*models[0]).DATASETS.TEST[0]
    num_images = len(DatasetCatalog.get(dataset))
    return [{"arm": arm.name, "default": arm.default, "values": arm_values(run, arm, evaluations, num_images),
             "paper": dict(arm.paper)} for arm in run.selected_arms()]
