"""tools/sweep.py: every (steps, boxes, seed) evaluated from one backbone pass per image, equal
to a direct evaluation with the same noise, resumable, with tables and plots."""
import csv
import importlib.util
import json
import os

import pytest
import torch
from detectron2.modeling import build_model

from diffusiondet.data.datasets import register_coco_json
from diffusiondet.data.synthetic import generate_synthetic_crowd
from diffusiondet.engine import Trainer
from diffusiondet.evaluation.sweep import Combination, image_rng, run_sweep
from tests.utils import tiny_cfg

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
NAME = "sweep_test_val"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep_data"))
    json_file = generate_synthetic_crowd(root, split="val", num_images=3, image_size=(64, 80),
                                         min_objects=2, max_objects=5, seed=11)  # fmt: skip
    register_coco_json(NAME, json_file, os.path.join(root, "val"))
    cfg = tiny_cfg("DATASETS.TEST", (NAME,), "MODEL.DiffusionDet.NUM_CLASSES", 5)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return cfg, model


class RecordingEvaluator:
    """Summarises the exact detections, so that runs can be compared value for value."""

    def reset(self):
        self.per_image = {}

    def process(self, inputs, outputs):
        for x, out in zip(inputs, outputs):
            inst = out["instances"]
            self.per_image[x["image_id"]] = (len(inst), float(inst.scores.sum()),
                                             float(inst.pred_boxes.tensor.sum()))  # fmt: skip

    def evaluate(self):
        counts, scores, boxes = zip(*(self.per_image[k] for k in sorted(self.per_image)))
        return {"det": {"AP": sum(scores), "count": sum(counts), "box_sum": sum(boxes)}}


def _backbone_counter(model):
    calls = []
    # Images through the backbone per call (the loader may batch them).
    handle = model.backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    return calls, handle


def test_one_backbone_pass_and_equal_to_direct_evaluation(setup, tmp_path):
    cfg, model = setup
    loader = Trainer.build_test_loader(cfg, NAME)
    # Not 2 steps: with the official ensemble they give exactly the detections of 1 step.
    todo = [Combination(s, n, r) for s in (1, 3) for n in (5, 9) for r in (0, 1)]
    made = []

    def factory(c):
        made.append(c)
        return RecordingEvaluator()

    calls, handle = _backbone_counter(model)
    done = run_sweep(model, loader, factory, todo, str(tmp_path), progress=False)
    assert sum(calls) == 3  # 3 images, 8 combinations: the backbone ran once per image
    assert set(done) == {c.key for c in todo} and len(made) == 8
    assert (model.sampler.steps, model.eval_num_proposals) == (1, 20)  # settings restored

    # One combination again, the plain way: inference with the same per-image noise.
    c = Combination(3, 9, 1)
    model.sampler.steps, model.eval_num_proposals = c.steps, c.boxes
    evaluator = RecordingEvaluator()
    evaluator.reset()
    for inputs in loader:
        evaluator.process(inputs, model.inference(inputs, per_image_rng=[image_rng(c.seed, x["image_id"]) for x in inputs]))
    direct = evaluator.evaluate()
    model.sampler.steps, model.eval_num_proposals = 1, 20
    # Same kernels on the same batches and the same noise: identical by construction.
    assert done[c.key]["results"] == direct
    # Other seeds, steps or boxes give other detections (the seed spread is a real measurement).
    summaries = [tuple(done[k.key]["results"]["det"].values()) for k in todo]
    assert len(set(summaries)) == len(todo)
    assert {done[k.key]["results"]["det"]["count"] > 0 for k in todo} == {True}

    # Resume: nothing left to do; a removed entry is the only one recomputed.
    calls.clear()
    made.clear()
    resumed = run_sweep(model, loader, factory, todo, str(tmp_path), progress=False)
    assert json.dumps(resumed, sort_keys=True) == json.dumps(done, sort_keys=True)  # NaN-safe
    assert calls == [] and made == []
    stored = json.load(open(tmp_path / "sweep_results.json"))
    del stored[c.key]
    json.dump(stored, open(tmp_path / "sweep_results.json", "w"))
    again = run_sweep(model, loader, factory, todo, str(tmp_path), progress=False)
    assert made == [c] and sum(calls) == 3
    assert json.dumps(again[c.key]["results"]) == json.dumps(done[c.key]["results"])
    handle.remove()


def _with_random_weights(config_file, opts, folder):
    """``opts`` plus MODEL.WEIGHTS of a randomly initialised model of that config: the sweep
    refuses to evaluate without weights."""
    from detectron2.modeling import build_model
    from diffusioninst import build_config

    weights = os.path.join(str(folder), "random.pth")
    torch.save({"model": build_model(build_config(config_file, opts)).state_dict()}, weights)
    return [*opts, "MODEL.WEIGHTS", weights]


def test_command_line_writes_tables_and_plots(setup, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "tools", "sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from tests.utils import TINY_OPTS

    opts = TINY_OPTS + ["DATASETS.TEST", (NAME,), "MODEL.DiffusionDet.NUM_CLASSES", 5]
    opts = _with_random_weights("configs/diffdet.synthetic.res18.yaml", opts, tmp_path)
    args = ["--config-file", "configs/diffdet.synthetic.res18.yaml", "--steps", "1", "2", "--boxes", "4", "8",
            "--seeds", "0", "1", "--output-dir", str(tmp_path), *map(str, opts)]  # fmt: skip
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "bbox/AP, mean ± std over seeds [0, 1]" in out and "| 8 |" in out
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["steps"], r["boxes"], r["seed"]) for r in rows] == [
        (s, n, r) for s in "12" for n in ("4", "8") for r in "01"]
    assert all(float(r["bbox/AP"]) >= 0 for r in rows)
    for png in ("sweep_vs_boxes.png", "sweep_vs_steps.png", "sweep_seed_spread.png"):
        assert (tmp_path / png).stat().st_size > 1000
    with pytest.raises(ValueError, match="--steps and --boxes"):
        tool.main(args[:4] + ["0"] + args[5:])


def test_command_line_on_diffusioninst_tabulates_mask_ap(setup, tmp_path, capsys):
    # DiffusionInst through the same sweep: bbox and segm metrics in the CSV, segm/AP tabulated.
    spec = importlib.util.spec_from_file_location("sweep_tool", os.path.join(ROOT, "tools", "sweep.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from tests.utils import TINY_OPTS

    opts = TINY_OPTS + ["DATASETS.TEST", (NAME,), "MODEL.DiffusionDet.NUM_CLASSES", 5,
                        "MODEL.DiffusionInst.MASK_BRANCH_CHANNELS", 16, "MODEL.DiffusionInst.MASK_NORM", "BN"]
    opts = _with_random_weights("configs/diffinst.synthetic.res18.yaml", opts, tmp_path)
    def args(metric):
        return ["--config-file", "configs/diffinst.synthetic.res18.yaml", "--steps", "1", "--boxes", "4", "8",
                "--seeds", "0", "--output-dir", str(tmp_path), "--metric", metric, "--no-plots",
                *map(str, opts)]  # fmt: skip

    assert tool.main(args("segm/AP")) == 0
    assert "segm/AP, mean ± std over seeds [0]" in capsys.readouterr().out
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["segm/AP"]) >= 0 and float(r["bbox/AP"]) >= 0 for r in rows)
    with pytest.raises(ValueError, match="segm/APx"):  # finished runs are reused, then the table
        tool.main(args("segm/APx"))
