"""Tables and plots of a flexibility sweep (``sweep_results.json`` of ``run_sweep``)."""
import csv
import math
import os
import statistics
from typing import Dict, List

from .sweep import primary_metric

__all__ = ["write_reports"]


def _flat(entry: dict) -> Dict[str, float]:
    return {f"{task}/{name}": value for task, metrics in entry["results"].items()
            for name, value in metrics.items()}  # fmt: skip


def _mean_std(values: List[float]):
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return statistics.fmean(finite), (statistics.pstdev(finite) if len(finite) > 1 else 0.0)


def write_reports(
    done: Dict[str, dict], output_dir: str, plots: bool = True, metric: str = ""
) -> Dict[str, str]:
    """Write sweep.csv (one row per run, every metric), sweep.md (``metric`` mean ± std over
    seeds, boxes × steps) and, with ``plots``, PNGs: metric vs boxes per step count, vs steps per
    box count, and the seed spread. ``metric`` is "task/name" (e.g. "segm/AP" for DiffusionInst's
    masks); "" picks :func:`primary_metric`. Returns {kind: path}."""
    entries = sorted(done.values(), key=lambda e: (e["steps"], e["boxes"], e["seed"]))
    metric = metric or primary_metric(entries[0]["results"])
    if metric not in _flat(entries[0]):
        raise ValueError(f"metric {metric!r} is not among the results: {sorted(_flat(entries[0]))}")
    columns = sorted({k for e in entries for k in _flat(e)})
    paths = {"csv": os.path.join(output_dir, "sweep.csv"), "md": os.path.join(output_dir, "sweep.md")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["steps", "boxes", "seed", *columns, "sampling_s"])
        for e in entries:
            flat = _flat(e)
            writer.writerow([e["steps"], e["boxes"], e["seed"], *[flat.get(c, "") for c in columns],
                             round(e["seconds"]["sampling"], 3)])  # fmt: skip
    steps = sorted({e["steps"] for e in entries})
    boxes = sorted({e["boxes"] for e in entries})
    cell = {(s, n): _mean_std([_flat(e)[metric] for e in entries if (e["steps"], e["boxes"]) == (s, n)])
            for s in steps for n in boxes}  # fmt: skip
    seeds = sorted({e["seed"] for e in entries})
    lines = [f"{metric}, mean ± std over seeds {seeds}", "",
             "| boxes \\ steps | " + " | ".join(str(s) for s in steps) + " |",
             "|---:|" + "---:|" * len(steps)]  # fmt: skip
    for n in boxes:
        lines.append(f"| {n} | " + " | ".join(f"{cell[s, n][0]:.2f} ± {cell[s, n][1]:.2f}" for s in steps) + " |")
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    if plots:
        paths.update(_plot(cell, steps, boxes, metric, output_dir))
    return paths


def _plot(cell, steps, boxes, metric, output_dir) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for kind, outer, inner, label in (("vs_boxes", steps, boxes, "boxes"), ("vs_steps", boxes, steps, "steps")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for o in outer:
            pts = [(i, *cell[(o, i) if kind == "vs_boxes" else (i, o)]) for i in inner]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=f"{'steps' if kind == 'vs_boxes' else 'boxes'} {o}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[kind] = os.path.join(output_dir, f"sweep_{kind}.png")
        fig.savefig(paths[kind], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    keys = [(s, n) for s in steps for n in boxes]
    ax.bar(range(len(keys)), [cell[k][1] for k in keys])
    ax.set_xticks(range(len(keys)), [f"S{s}\nN{n}" for s, n in keys], fontsize=6)
    ax.set_ylabel(f"std of {metric} over seeds")
    fig.tight_layout()
    paths["seed_spread"] = os.path.join(output_dir, "sweep_seed_spread.png")
    fig.savefig(paths["seed_spread"], dpi=100)
    plt.close(fig)
    return paths
