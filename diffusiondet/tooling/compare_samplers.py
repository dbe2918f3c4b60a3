"""The arithmetic and the table of ``tools/dev/compare_samplers.py`` (AP against the number of
model calls for several samplers): which SAMPLE_STEP makes c model calls, the ``--samplers``
specs, and the markdown table read from each sampler's ``sweep.csv``.
"""
import csv
import os
import statistics


def steps_for_calls(calls: int) -> int:
    """SAMPLE_STEP that makes ``calls`` model calls under the official ensemble."""
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")
    return 1 if calls == 1 else calls + 1


def parse_sampler(spec: str):
    """"name=KEY:VALUE,KEY:VALUE" -> (name, [KEY, VALUE, ...])."""
    name, _, overrides = spec.partition("=")
    if not name or not overrides:
        raise ValueError(f"sampler spec must be NAME=KEY:VALUE[,KEY:VALUE...], got {spec!r}")
    opts = []
    for pair in overrides.split(","):
        key, sep, value = pair.partition(":")
        if not sep:
            raise ValueError(f"{spec!r}: {pair!r} is not KEY:VALUE")
        opts += [key, value]
    return name, opts


def summarize(output_dir, names, calls, metric):
    """Markdown table: one row per call count, one column per sampler (mean ± std over seeds)."""
    header = "| model calls | " + " | ".join(names) + " |"
    lines = [header, "|---:|" + "---:|" * len(names)]
    for c in calls:
        cells = []
        for name in names:
            with open(os.path.join(output_dir, name, "sweep.csv")) as f:
                rows = [r for r in csv.DictReader(f) if int(r["steps"]) == steps_for_calls(c)]
            values = [float(r[metric]) for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
