"""The table of every config under ``configs/`` (``docs/configs.md``), generated so it cannot go stale.

    python -m diffusiondet.tooling.config_table            # rewrite docs/configs.md
    python -m diffusiondet.tooling.config_table --check    # exit 1 if docs/configs.md differs

One row per ``configs/**/*.yaml``: the file it inherits from (``_BASE_``), the meta-architecture,
the backbone, the training and test datasets, the boxes in training and at inference, the
sampling steps, the schedule (iterations x images per batch) and the keys the file sets itself
(listed when there are few, as in the ablations). The values are the merged
ones: DiffusionDet's defaults (``add_diffusiondet_config``), then the ``_BASE_`` chain, then the
file, exactly as detectron2 merges a config file. Keys the core does not define (a package built
on DiffusionDet, such as DiffusionInst's ``MODEL.DiffusionInst``) are merged without being
checked: the table shows only core and detectron2 keys, and ``tests/test_configs.py`` builds
every config with its validation.
"""
import argparse
import os
import sys

import yaml
from detectron2.config import get_cfg

from diffusiondet.config import add_diffusiondet_config, merge_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(ROOT, "configs")
OUTPUT = os.path.join(ROOT, "docs", "configs.md")

COLUMNS = ("config", "base", "model", "backbone", "train data", "test data", "boxes (train / eval)",
           "steps", "iterations x batch", "own keys")
# A file setting more keys than this is summarised by its count in the last column.
MAX_LISTED_KEYS = 3

HEADER = """# Every config at a glance

This page lists every config under `configs/` with what it inherits from and the values that
tell the configs apart: model, backbone, datasets, boxes, sampling steps, schedule, and the keys
each file sets itself (by name when there are at most three, as in the ablations).

It is generated from the YAML files; do not edit it by hand. After changing a config, run
`python -m diffusiondet.tooling.config_table` (a test fails while this page and the configs
disagree). Values are the merged ones: DiffusionDet's defaults, then the `_BASE_` chain, then the
file. "boxes" is `NUM_PROPOSALS` in training and `EVAL_NUM_PROPOSALS` at inference (`--boxes`;
"same" when it is 0), "steps" is `SAMPLE_STEP` (`--steps`). The keys themselves are described in
[configuration.md](configuration.md), the backbones in [backbones.md](backbones.md), the paper
models and ablations in [paper_configs.md](paper_configs.md).
"""


def config_files(config_dir=CONFIG_DIR):
    """Every ``*.yaml`` under ``config_dir``, as sorted paths relative to it (``/``-separated)."""
    found = []
    for folder, _, names in os.walk(config_dir):
        for name in names:
            if name.endswith(".yaml"):
                rel = os.path.relpath(os.path.join(folder, name), config_dir)
                found.append(rel.replace(os.sep, "/"))
    # Top-level files first, then the folders (ablations), each sorted by name.
    return sorted(found, key=lambda rel: (rel.count("/"), rel))


def merged_config(path):
    """The config ``path`` gives on top of DiffusionDet's defaults, unchecked (see module doc)."""
    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    cfg.set_new_allowed(True)
    merge_config_file(cfg, path)  # safe YAML, as build_config
    return cfg


def _load(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def base_of(path, config_dir=CONFIG_DIR):
    """The ``_BASE_`` a file names, relative to ``config_dir`` ("" for none)."""
    base = _load(path).get("_BASE_", "")
    if not base:
        return ""
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), base))
    return os.path.relpath(resolved, config_dir).replace(os.sep, "/")


def own_keys(path):
    """``(dotted key, value)`` for every leaf the file itself sets, in file order."""
    found = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
            elif prefix or key != "_BASE_":
                found.append((prefix + key, value))

    walk(_load(path), "")
    return found


def describe_own_keys(path):
    """The keys a file sets beyond its base: each by its last name when there are at most
    ``MAX_LISTED_KEYS`` (the ablations), else how many."""
    keys = own_keys(path)
    if not keys:
        return "-"
    if len(keys) > MAX_LISTED_KEYS:
        return f"{len(keys)} keys"
    return ", ".join(f"`{key.rsplit('.', 1)[-1]} {value}`" for key, value in keys)


def describe_backbone(cfg):
    name = cfg.MODEL.BACKBONE.NAME
    if name == "build_resnet_fpn_backbone":
        norm = cfg.MODEL.RESNETS.NORM
        return f"ResNet-{cfg.MODEL.RESNETS.DEPTH}-FPN" + ("" if norm == "FrozenBN" else f" ({norm})")
    if name == "build_swintransformer_fpn_backbone":
        return f"Swin-{cfg.MODEL.SWIN.SIZE}-FPN"
    if name == "build_timm_fpn_backbone":
        return f"timm {cfg.MODEL.TIMM.NAME}-FPN"
    return name


def _names(datasets):
    return ", ".join(datasets) if datasets else "-"


def row(rel, config_dir=CONFIG_DIR):
    """The table's cells for ``configs/<rel>``."""
    path = os.path.join(config_dir, rel)
    cfg = merged_config(path)
    dd = cfg.MODEL.DiffusionDet
    base = base_of(path, config_dir)
    eval_boxes = dd.EVAL_NUM_PROPOSALS if dd.EVAL_NUM_PROPOSALS > 0 else "same"
    return (
        f"`{rel}`",
        f"`{base}`" if base else "-",
        cfg.MODEL.META_ARCHITECTURE,
        describe_backbone(cfg),
        _names(cfg.DATASETS.TRAIN),
        _names(cfg.DATASETS.TEST),
        f"{dd.NUM_PROPOSALS} / {eval_boxes}",
        str(dd.SAMPLE_STEP),
        f"{cfg.SOLVER.MAX_ITER} x {cfg.SOLVER.IMS_PER_BATCH}",
        describe_own_keys(path),
    )


def render(config_dir=CONFIG_DIR):
    """The whole ``docs/configs.md`` text."""
    lines = [HEADER, "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for rel in config_files(config_dir):
        lines.append("| " + " | ".join(row(rel, config_dir)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=OUTPUT, help="file to write (default: docs/configs.md)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from the configs")
    args = parser.parse_args(argv)
    text = render()
    current = open(args.output).read() if os.path.exists(args.output) else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run python -m diffusiondet.tooling.config_table")
            return 1
        print(f"{args.output} is up to date")
        return 0
    if current != text:
        with open(args.output, "w") as f:
            f.write(text)
    print(f"wrote {args.output} ({len(config_files())} configs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
