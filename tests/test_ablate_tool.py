"""tools/ablate.py on a tiny study (Table 4a, 2 arms × 2 seeds, 2 iterations of a tiny model on 6
synthetic images): the table's cells are the mean ± std of the evaluations it ran, and a run killed
in the middle resumes to the same table without redoing what it had finished."""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from tests.utils import TINY_OPTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*map(str, TINY_OPTS), "MODEL.DiffusionDet.NUM_CLASSES", "5"]
SEEDS = (1, 2)


def _command(out):
    return [sys.executable, os.path.join(REPO, "tools", "ablate.py"), "--study", "4a", "--arms", "0.1", "2.0",
            "--seeds", *map(str, SEEDS), "--max-iter", "2", "--num-images", "6", "3", "--output-dir", str(out),
            "--config-file", os.path.join(REPO, "configs", "diffdet.synthetic.res18.yaml"), "--opts", *TINY]


def _env(tmp):
    return {**os.environ, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(tmp / "datasets")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    out = tmp / "out"
    proc = subprocess.run(_command(out), cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, out, proc.stdout


def _table(out):
    with open(out / "study_4a" / "table.md") as f:
        return f.read()


def test_table_cells_are_mean_and_std_of_the_evaluations_run(uninterrupted):
    _, out, stdout = uninterrupted
    table = _table(out)
    assert table in stdout  # the printed table is the written one
    with open(out / "study_4a" / "results.json") as f:
        rows = {r["arm"]: r for r in json.load(f)["rows"]}
    assert set(rows) == {"0.1", "2.0"}
    for arm, folder in (("0.1", "SNR_SCALE=0.1"), ("2.0", "default")):
        per_seed = []
        for seed in SEEDS:
            model = out / "models" / folder / f"seed_{seed}"
            assert (model / "model_final.pth").is_file()
            with open(model / "eval_default" / "sweep_results.json") as f:
                done = json.load(f)
            per_seed.append(done[f"steps1_boxes300_seed{seed}"]["results"]["bbox"]["AP75"])
        assert rows[arm]["values"]["AP75 1@300"] == pytest.approx(per_seed, abs=0)
        cell = f"{statistics.mean(per_seed):.2f} ± {statistics.stdev(per_seed):.2f}"
        line = next(line for line in table.splitlines() if line.startswith(f"| {arm} |")
                    or line.startswith(f"| **{arm}** |"))
        assert line.split(" | ")[3] == cell
    assert table.splitlines()[-1].endswith("| 45.8 | 64.1 | 50.4 |")  # the paper's, beside
    with open(out / "study_4a" / "plot.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"


def test_a_killed_study_resumes_to_the_same_table_without_redoing_finished_work(uninterrupted, tmp_path):
    _, reference, _ = uninterrupted
    out = tmp_path / "out"
    first_eval = out / "models" / "SNR_SCALE=0.1" / "seed_1" / "eval_default" / "sweep_results.json"
    proc = subprocess.Popen(_command(out), cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not first_eval.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_eval.exists(), "the study ended or timed out before its first evaluation"
    assert not (out / "study_4a" / "table.md").exists(), "killed too late to test a resume"
    finished = out / "models" / "SNR_SCALE=0.1" / "seed_1" / "model_final.pth"
    stamps = (finished.stat().st_mtime_ns, first_eval.stat().st_mtime_ns)
    rerun = subprocess.run(_command(out), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (finished.stat().st_mtime_ns, first_eval.stat().st_mtime_ns) == stamps  # not redone
    assert _table(out) == _table(reference)


def test_another_recipe_in_the_same_folder_is_refused(uninterrupted):
    tmp, out, _ = uninterrupted
    command = _command(out)
    command[command.index("--max-iter") + 1] = "3"
    proc = subprocess.run(command, cwd=tmp, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "another recipe" in proc.stderr
