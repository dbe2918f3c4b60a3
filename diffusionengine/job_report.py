"""Tables and sanity checks of the DiffusionEngine demo job's results
(:func:`diffusionengine.main_job.run_engine_job`, ``engine_results.json``)."""
import math
import statistics
from typing import Dict, Iterator, List, Tuple

__all__ = ["check_results", "format_tables"]


def _cell(values) -> str:
    values = values if isinstance(values, list) else [values]
    if any(v is None or math.isnan(v) for v in values):
        return "n/a"
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread}"


def _adapter_table(adapter: Dict, iters: int) -> List[str]:
    lines = ["| backbone | steps | boxes | AP | AP50 | AP75 |", "|---|---:|---:|---:|---:|---:|"]
    names = (("trained_unet", f"tiny LDM U-Net, trained, frozen ({iters} it)"),
             ("random_unet", f"tiny LDM U-Net, random init, frozen ({iters} it)"),
             ("res18_main_job", "ResNet-18-FPN, main job"))
    for key, name in names:
        for r in adapter[key]:
            cells = " | ".join(_cell(r[m]) for m in ("AP", "AP50", "AP75"))
            lines.append(f"| {name} | {r['steps']} | {r['boxes']} | {cells} |")
    return lines


def _labels_table(labels: Dict) -> List[str]:
    lines = ["| δ | precision (generated) | recall (generated) | labels / image | precision (real refs) |"
             " recall (real refs) |", "|---:|---:|---:|---:|---:|---:|"]
    for gen, real in zip(labels["generated"], labels["real_references"]):
        pct = [_cell(100 * v if v == v else v) for v in (gen["precision"], gen["recall"])]
        pct_real = [_cell(100 * v if v == v else v) for v in (real["precision"], real["recall"])]
        lines.append(f"| {gen['delta']} | {pct[0]} | {pct[1]} | {gen['labels_per_image']:.1f} | "
                     f"{pct_real[0]} | {pct_real[1]} |")
    return lines


def _mix_table(mix: Dict, iters: int) -> List[str]:
    lines = ["| training data | steps | boxes | AP | AP50 | AP75 |", "|---|---:|---:|---:|---:|---:|"]
    for kind, name in (("real", "real"), ("gen", "real + generated")):
        per_seed = mix[kind]  # seeds x rows
        for i, first in enumerate(per_seed[0]):
            cells = [_cell([rows[i][m] for rows in per_seed]) for m in ("AP", "AP50", "AP75")]
            lines.append(f"| {name} ({iters} it) | {first['steps']} | {first['boxes']} | " + " | ".join(cells) + " |")
    return lines


def format_tables(results: Dict) -> str:
    """The job's markdown report (four tables and what they measure)."""
    s, labels, gen = results["settings"], results["labels"], results["generated_set"]
    ldm = results["tiny_ldm"]["summary"]
    out = [f"# DiffusionEngine demo on the synthetic set (tiny LDM: {ldm['config']['vae_steps']} VAE +"
           f" {ldm['config']['unet_steps']} U-Net steps, {ldm['training_seconds']:.0f} s)", "",
           "## 1. Adapter box AP on VAL (frozen backbone vs the ResNet-18 main job)", "",
           *_adapter_table(results["adapter"], s["adapter_iters"]), "",
           f"ResNet-18 rows: {results['adapter']['res18_source']}.", "",
           f"## 2. Label precision / recall at IoU 0.5 ({labels['images']} images, {labels['size']} px)", "",
           f"Ground truth: {labels['ground_truth']}. 'real refs': the same detector on the references themselves.",
           "", *_labels_table(labels), "",
           f"## 3. ResNet-18 on real vs real + generated ({len(s['mix_seeds'])} seeds, mean ± std)", "",
           f"Generated set: {gen['images']} images ({gen['labels_per_class']} labels), img2img from TRAIN"
           f" references at strength {gen['strength'][0]}-{gen['strength'][1]}, {s['gen_size']} px."
           f" Both runs: {s['mix_iters']} iterations (the main job's schedule, shortened).", "",
           *_mix_table(results["real_vs_generated"], s["mix_iters"]), "",
           "## 4. Cost of a labelled image (text-to-image, "
           f"{s['gen_steps']} DDIM steps, guidance {s['gen_guidance']}, labels from the last step)", "",
           "| size | CPU s / image | wall s / image | threads |", "|---:|---:|---:|---:|"]
    for r in results["timing"]:
        out.append(f"| {r['size']} px | {r['cpu_seconds_per_image']:.2f} | {r['wall_seconds_per_image']:.2f} |"
                   f" {r['threads']} |")
    return "\n".join(out)


def _values(results: Dict) -> Iterator[Tuple[str, float, float, float, bool]]:
    """(name, value, low, high, may be NaN) of every number the tables show."""
    for key, rows in results["adapter"].items():
        if isinstance(rows, list):
            for r in rows:
                for m in ("AP", "AP50", "AP75"):
                    yield f"adapter.{key}.{m}", r[m], 0.0, 100.0, False
    for kind, per_seed in results["real_vs_generated"].items():
        for rows in per_seed:
            for r in rows:
                for m in ("AP", "AP50", "AP75"):
                    yield f"real_vs_generated.{kind}.{m}", r[m], 0.0, 100.0, False
    for part in ("generated", "real_references"):
        for r in results["labels"][part]:
            yield f"labels.{part}.recall@{r['delta']}", r["recall"], 0.0, 1.0, False
            # No label above δ: precision is undefined, not wrong.
            yield f"labels.{part}.precision@{r['delta']}", r["precision"], 0.0, 1.0, r["labels_per_image"] == 0
    for r in results["timing"]:
        yield f"timing.{r['size']}.cpu_seconds_per_image", r["cpu_seconds_per_image"], 0.0, math.inf, False


def check_results(results: Dict) -> None:
    """Raise ValueError naming every value that is not finite or out of its range."""
    def ok(v, lo, hi, nan_ok):
        if v is None or v != v:
            return v is not None and nan_ok
        return math.isfinite(v) and lo <= v <= hi

    bad = [f"{name} = {v}" for name, v, lo, hi, nan_ok in _values(results) if not ok(v, lo, hi, nan_ok)]
    if bad:
        raise ValueError("engine_results.json has values out of range: " + ", ".join(bad))
