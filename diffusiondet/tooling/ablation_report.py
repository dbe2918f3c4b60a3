"""The outputs of a study (diffusiondet/tooling/ablation.py): a Markdown table and a CSV with each
arm's numbers as mean ± std over seeds beside the paper's, one plot, and results.json.

A cell's mean and std are over every (training seed, sampling seed) pair of the arm; the std is
the sample standard deviation (0 for a single value), as the main job's seed table.
"""
import csv
import json
import math
import os
import statistics
from typing import Dict, List, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .ablation_studies import Study

__all__ = ["mean_std", "study_figure", "study_table", "write_study_reports"]

_DPI = 100


def mean_std(values: Sequence[float]):
    """(mean, sample std) of ``values``; std 0 for one value, (nan, nan) for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: Sequence[float]) -> str:
    mean, std = mean_std(values)
    digits = 2 if mean < 10 else 1  # images/s on a CPU can be small
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def study_table(study: Study, rows: List[Dict], note: str = "") -> str:
    """Markdown: one line per arm, this project's columns then the paper's (– where it has none);
    the main job's own setting in bold."""
    labels = [c.label for c in study.columns]
    paper_labels = [lab for lab in labels if any(lab in r["paper"] for r in rows)]
    header = ["arm", *labels, *(f"paper {lab}" for lab in paper_labels)]
    lines = [f"**{study.title}**" + (f" — {note}" if note else ""), "",
             "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for r in rows:
        name = f"**{r['arm']}**" if r["default"] else r["arm"]
        ours = [_cell(r["values"][lab]) for lab in labels]
        paper = [_paper(r["paper"].get(lab)) for lab in paper_labels]
        lines.append("| " + " | ".join([name, *ours, *paper]) + " |")
    return "\n".join(lines)


def _paper(value) -> str:
    return "–" if value is None else f"{value:g}"


def study_figure(study: Study, rows: List[Dict]) -> Figure:
    """This project's numbers (mean ± std) next to the paper's. Studies whose columns are one
    metric over steps or boxes (4c, 5) draw a line per arm across the columns; the others (4a,
    4b, 6) draw the first column per arm."""
    across = len({c.metric for c in study.columns}) == 1 and len(study.columns) > 1
    fig = Figure(figsize=(9.0, 3.8), dpi=_DPI)
    FigureCanvasAgg(fig)
    ours_ax, paper_ax = fig.subplots(1, 2)
    if across:
        labels = [c.label for c in study.columns]
        for r in rows:
            stats = [mean_std(r["values"][lab]) for lab in labels]
            ours_ax.errorbar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                             capsize=3, label=r["arm"])
            known = [(i, r["paper"][lab]) for i, lab in enumerate(labels) if lab in r["paper"]]
            if known:
                paper_ax.plot([i for i, _ in known], [v for _, v in known], marker="o", label=r["arm"])
        for ax in (ours_ax, paper_ax):
            ax.set_xticks(range(len(labels)), labels)
            ax.legend(fontsize=7)
    else:
        label = study.columns[0].label
        names = [r["arm"] for r in rows]
        stats = [mean_std(r["values"][label]) for r in rows]
        ours_ax.errorbar(range(len(rows)), [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o", capsize=4)
        known = [(i, r["paper"][label]) for i, r in enumerate(rows) if label in r["paper"]]
        paper_ax.plot([i for i, _ in known], [v for _, v in known], "s", color="tab:red")
        for ax in (ours_ax, paper_ax):
            ax.set_xticks(range(len(rows)), names, fontsize=8)
            ax.set_ylabel(label)
    metric = study.columns[0].metric
    ours_ax.set_title("this project: synthetic set, CPU recipe (mean ± std)", fontsize=9)
    paper_ax.set_title("paper: COCO val2017, R-50", fontsize=9)
    ours_ax.set_ylabel(metric)
    for ax in (ours_ax, paper_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(study.title, fontsize=10)
    fig.tight_layout()
    return fig


def write_study_reports(study: Study, rows: List[Dict], output_dir: str, note: str = "") -> Dict[str, str]:
    """table.md, table.csv (one line per arm and column: mean, std, n, the values, the paper's),
    plot.png and results.json in ``output_dir``; returns {kind: path}."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {k: os.path.join(output_dir, f) for k, f in
             (("md", "table.md"), ("csv", "table.csv"), ("png", "plot.png"), ("json", "results.json"))}
    with open(paths["md"], "w") as f:
        f.write(study_table(study, rows, note) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study", "arm", "column", "metric", "mean", "std", "n", "values", "paper"])
        for r in rows:
            for column in study.columns:
                values = r["values"][column.label]
                mean, std = mean_std(values)
                writer.writerow([study.name, r["arm"], column.label, column.metric, f"{mean:.4f}", f"{std:.4f}",
                                 len(values), ";".join(f"{v:.4f}" for v in values),
                                 r["paper"].get(column.label, "")])
    study_figure(study, rows).savefig(paths["png"], dpi=_DPI)
    with open(paths["json"], "w") as f:
        json.dump({"study": study.name, "title": study.title, "rows": rows}, f, indent=1)
    return paths
