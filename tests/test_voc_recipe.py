"""tools/voc_recipe.py end to end on a tiny Pascal VOC tree: convert, train, sweep."""
import csv
import os
import subprocess
import sys

from PIL import Image

from tests.utils import TINY_OPTS

ROOT = os.path.join(os.path.dirname(__file__), "..")
BOXES = {"a": [("rbc", (5, 5, 30, 25)), ("wbc", (35, 10, 60, 40))],
         "b": [("rbc", (10, 8, 40, 30))], "c": [("wbc", (2, 2, 20, 20)), ("rbc", (30, 20, 50, 44))]}


def _voc(root):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for name, objects in BOXES.items():
        Image.new("RGB", (64, 48), (200, 120, 120)).save(root / "JPEGImages" / f"{name}.jpg")
        body = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                       f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                       for c, b in objects)  # fmt: skip
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>64</width><height>48</height>"
            f"<depth>3</depth></size>{body}</annotation>")
    (root / "ImageSets/Main/trainval.txt").write_text("a\nb\n")
    (root / "ImageSets/Main/test.txt").write_text("c\n")


def _recipe(args):
    """Run tools/voc_recipe.py as a user does; it must succeed."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "voc_recipe.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_recipe_trains_and_sweeps(tmp_path):
    _voc(tmp_path / "voc")
    out = tmp_path / "out"
    tiny = [str(v) for v in TINY_OPTS] + ["INPUT.MIN_SIZE_TEST", "48", "SOLVER.IMS_PER_BATCH", "2"]
    args = ["--voc-root", str(tmp_path / "voc"), "--output-dir", str(out), "--max-iter", "2",
            "--steps", "1", "--boxes", "5", "9", "--seeds", "0", "--opts", *tiny]  # fmt: skip
    _recipe(args)
    final = out / "train" / "model_final.pth"
    assert final.exists() and (out / "annotations" / "test.json").exists()
    with open(out / "sweep" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["steps"], r["boxes"]) for r in rows] == [("1", "5"), ("1", "9")]
    assert all(0.0 <= float(r["bbox/AP"]) <= 100.0 for r in rows)
    stamp = final.stat().st_mtime_ns
    _recipe(args)  # trained weights are reused, the finished sweep is not redone
    assert final.stat().st_mtime_ns == stamp
