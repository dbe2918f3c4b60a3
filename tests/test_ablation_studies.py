"""The studies of tools/ablate.py (diffusiondet/tooling/ablation_studies.py): each arm changes the
main job's config exactly as its COCO ablation config in configs/ablations/ changes the paper's,
the paper's numbers are those of the paper's tables, and the reports compute what they claim."""
import csv
import math
import os

import pytest

from diffusiondet.config import build_config
from diffusiondet.tooling.ablation import StudyRun, _check_recipe, _slug, model_dir
from diffusiondet.tooling.ablation_report import mean_std, study_table, write_study_reports
from diffusiondet.tooling.ablation_studies import MAIN_JOB_SEEDS, STUDIES, get_study
from tests.test_ablation_configs import EXPECTED

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MAIN = os.path.join(ROOT, "configs", "diffdet.synthetic.res18.yaml")
D = "MODEL.DiffusionDet."

# (study, arm) -> the configs/ablations file of the same row.
ARM_FILES = {
    ("4a", "0.1"): "table4a_signal_scale/scale0.1.yaml", ("4a", "1.0"): "table4a_signal_scale/scale1.0.yaml",
    ("4a", "2.0"): "table4a_signal_scale/scale2.0.yaml", ("4a", "3.0"): "table4a_signal_scale/scale3.0.yaml",
    ("4b", "Repeat"): "table4b_gt_padding/repeat.yaml", ("4b", "Cat Gaussian"): "table4b_gt_padding/gaussian.yaml",
    ("4b", "Cat Uniform"): "table4b_gt_padding/uniform.yaml", ("4b", "Cat Full"): "table4b_gt_padding/full_image.yaml",
    ("4c", "no DDIM, no renewal"): "table4c_sampling/ddim_off.renewal_off.yaml",
    ("4c", "DDIM, no renewal"): "table4c_sampling/ddim_on.renewal_off.yaml",
    ("4c", "no DDIM, renewal"): "table4c_sampling/ddim_off.renewal_on.yaml",
    ("4c", "DDIM, renewal"): "table4c_sampling/ddim_on.renewal_on.yaml",
    ("5", "100"): "table5_train_boxes/train100.yaml", ("5", "300"): "table5_train_boxes/train300.yaml",
    ("6", "4×1 (1 step, 300 boxes)"): "table6_stages_steps/stages6.steps1.yaml",
    ("6", "4×2 (2 steps, 300 boxes)"): "table6_stages_steps/stages6.steps2.yaml",
}
# Keys a study sets otherwise: the synthetic model has 4 stages, not 6; Table 6's steps are the arm's.
NOT_COMPARED = {"NUM_HEADS", "SAMPLE_STEP"}


@pytest.mark.parametrize("study,arm", sorted(ARM_FILES), ids=lambda x: str(x))
def test_arm_sets_what_its_coco_ablation_config_sets(study, arm):
    a = get_study(study).arm(arm)
    cfg = build_config(MAIN, [*a.train, *a.evaluate])
    expected = EXPECTED[ARM_FILES[(study, arm)]]
    for key, value in expected.items():
        if key not in NOT_COMPARED:
            assert cfg.MODEL.DiffusionDet[key] == value, (study, arm, key)
    if "SAMPLE_STEP" in expected:
        assert a.steps == expected["SAMPLE_STEP"], (study, arm)
    changed = {k[len(D):] for k in [*a.train, *a.evaluate][::2]}
    assert changed <= set(expected), f"{study} {arm} changes {changed - set(expected)}, its COCO config does not"


def test_evaluation_only_arms_train_nothing_and_training_arms_evaluate_nothing():
    for study in STUDIES.values():
        for arm in study.arms:
            assert not (arm.train and arm.evaluate), (study.name, arm.name)
            if study.single_model:
                assert not arm.train, (study.name, arm.name)
        assert sum(a.default for a in study.arms) == 1, study.name
        for arm in study.arms:  # every cell has its steps and boxes
            assert all(s and b for _, s, b in study.cells(arm)), (study.name, arm.name)


def test_paper_numbers_are_the_papers_tables():
    s4a, s4b, s4c, s5, s6 = (get_study(n) for n in ("4a", "4b", "4c", "5", "6"))
    assert [s4a.arm(n).paper["AP 1@300"] for n in ("0.1", "1.0", "2.0", "3.0")] == [38.9, 45.0, 45.8, 45.6]
    assert s4b.arm("Repeat").paper == {"AP 1@300": 44.2, "AP50 1@300": 62.0, "AP75 1@300": 48.3}
    assert s4c.arm("no DDIM, no renewal").paper == {"1 step": 45.8, "2 steps": 44.4, "3 steps": 44.1}
    assert s5.arm("300").paper == {"100 boxes": 42.8, "300 boxes": 45.7, "1000 boxes": 46.3}
    assert s5.arm("50").paper == {}
    assert s6.arm("4×1, 1000 boxes").paper == {"AP": 46.8, "images/s": 24}
    assert s6.arm("4×2 (2 steps, 300 boxes)").steps == 2


def test_study_seeds_and_the_shared_model_folders(tmp_path):
    run = StudyRun(get_study("4a"), output_dir=str(tmp_path))
    assert run.training_seeds() == list(MAIN_JOB_SEEDS)
    assert run.models(get_study("4a").arm("0.1")) == [((D + "SNR_SCALE", 0.1), s) for s in MAIN_JOB_SEEDS]
    assert StudyRun(get_study("4b")).training_seeds() == list(MAIN_JOB_SEEDS[:1])
    single = StudyRun(get_study("4c"), seeds=[7, 8])
    assert single.training_seeds() == [7] and single.sampling_seeds(7) == [7, 8, 9]
    # The recipe's own model is one folder for every study that needs it.
    assert model_dir("o", (), 1) == os.path.join("o", "models", "default", "seed_1")
    assert _slug((D + "PADDING", "repeat", D + "SNR_SCALE", 0.1)) == "PADDING=repeat_SNR_SCALE=0.1"
    with pytest.raises(ValueError, match="no arm 'nope'"):
        StudyRun(get_study("4a"), arms=["nope"]).selected_arms()
    with pytest.raises(ValueError, match="unknown study"):
        get_study("7")


def test_an_output_folder_refuses_models_of_another_recipe(tmp_path):
    _check_recipe(StudyRun(get_study("4a"), output_dir=str(tmp_path)))
    _check_recipe(StudyRun(get_study("5"), output_dir=str(tmp_path)))  # same recipe: fine
    with pytest.raises(ValueError, match="another recipe"):
        _check_recipe(StudyRun(get_study("4a"), output_dir=str(tmp_path), recipe=("SOLVER.MAX_ITER", 10)))


def test_reports_give_mean_and_sample_std_beside_the_paper(tmp_path):
    study = get_study("4a")
    rows = [{"arm": a.name, "default": a.default, "paper": dict(a.paper),
             "values": {c.label: [10.0 + i, 12.0 + i, 17.0 + i] for c in study.columns}}
            for i, a in enumerate(study.arms)]
    assert mean_std([10.0, 12.0, 17.0]) == pytest.approx((13.0, math.sqrt(13.0)))
    assert mean_std([4.0]) == (4.0, 0.0)
    table = study_table(study, rows, "note")
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| arm | AP 1@300 | AP50 1@300 | AP75 1@300 | AP 4@300 | paper AP 1@300 |")
    # Arm 1.0 (i = 1): values 11, 13, 18 -> mean 14, std sqrt(13) = 3.6; paper 45 / 63 / 48.9.
    assert lines[2] == "| 1.0 | 14.0 ± 3.6 | 14.0 ± 3.6 | 14.0 ± 3.6 | 14.0 ± 3.6 | 45 | 63 | 48.9 |"
    assert lines[3].startswith("| **2.0** | 15.0 ± 3.6 |")
    paths = write_study_reports(study, rows, str(tmp_path))
    with open(paths["csv"]) as f:
        records = list(csv.DictReader(f))
    first = records[0]
    assert (first["arm"], first["column"], first["mean"], first["n"], first["paper"]) == ("0.1", "AP 1@300", "13.0000", "3", "38.9")
    assert first["values"] == "10.0000;12.0000;17.0000"
    assert float(first["std"]) == pytest.approx(math.sqrt(13.0), abs=1e-4)
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
