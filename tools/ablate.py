#!/usr/bin/env python
"""The paper's ablations (DiffusionDet §4.4) at laptop scale, on the synthetic set with the main
job's model and a halved CPU recipe, each arm over several seeds, beside the paper's numbers.

    python tools/ablate.py --study 4a          # signal scale 0.1 / 1.0 / 2.0 / 3.0 (3 seeds)
    python tools/ablate.py --study 4b          # GT padding: repeat / Gaussian / uniform / full (1 seed)
    python tools/ablate.py --study 4c          # DDIM x box renewal at 1 / 2 / 3 steps (one model)
    python tools/ablate.py --study 5           # training boxes 50 / 100 / 300 x evaluation boxes
    python tools/ablate.py --study 6           # 1 vs 2 steps, 1000 boxes, images/s (one model)
    python tools/ablate.py --study all

Options: --seeds S ... (training seeds; default the study's number of 40244023 1 2), --arms NAME ...
(a subset of the study's rows), --max-iter N (SOLVER.MAX_ITER, the learning-rate step at 5/6 of
it; default 300 with the step at 250), --num-images TRAIN VAL (the first images of the synthetic
set), --output-dir DIR (default output/ablations), --config-file (default the main job's), --opts KEY VALUE ... (config overrides).

Writes DIR/study_<name>/{table.md, table.csv, plot.png, results.json} and prints the table.
Models live in DIR/models/ and are shared by the studies (the recipe's own model is trained once
for all of them); trainings resume from their last checkpoint and finished evaluations are not
redone, so the same command after a kill goes on where it stopped. On a terminal a bar over the
study's runs shows an ETA (DIFFUSIONDET_PROGRESS=1 forces it into a log). Results and how long each
study takes on 2 cores: docs/ablations.md.
"""
import argparse
import sys
import time

from detectron2.utils.logger import setup_logger

from diffusiondet.tooling.ablation import MAIN_JOB_CONFIG, StudyRun, run_study
from diffusiondet.tooling.ablation_report import write_study_reports
from diffusiondet.tooling.ablation_studies import RECIPE, STUDIES, get_study


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", required=True, choices=[*STUDIES, "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    parser.add_argument("--arms", nargs="+", default=None, help="only these rows of the study")
    parser.add_argument("--max-iter", type=int, default=None, help="training iterations (default 300)")
    parser.add_argument("--num-images", type=int, nargs=2, default=None, metavar=("TRAIN", "VAL"),
                        help="train and evaluate on the first TRAIN / VAL synthetic images (default: all)")
    parser.add_argument("--output-dir", default="output/ablations")
    parser.add_argument("--config-file", default=MAIN_JOB_CONFIG,
                        help="the model and data of every arm (default: the main job's)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser.parse_args(argv)


def recipe(max_iter):
    if max_iter is None:
        return RECIPE
    if max_iter < 1:
        raise ValueError(f"--max-iter must be >= 1, got {max_iter}")
    return ("SOLVER.MAX_ITER", max_iter, "SOLVER.STEPS", (max(1, max_iter * 5 // 6),))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="detectron2", abbrev_name="d2")
    setup_logger(name="diffusiondet")
    names = list(STUDIES) if "all" in args.study else args.study
    for name in names:
        study = get_study(name)
        run = StudyRun(study, output_dir=args.output_dir, seeds=args.seeds, arms=args.arms,
                       recipe=recipe(args.max_iter), opts=args.opts, config_file=args.config_file,
                       num_images=tuple(args.num_images) if args.num_images else None)
        start = time.perf_counter()
        rows = run_study(run)
        seeds = run.training_seeds()
        note = (f"{'one model, SEED' if study.single_model else 'training seeds'} {' '.join(map(str, seeds))}"
                + (f", {study.sampling_seeds} sampling seeds each" if study.sampling_seeds > 1 else ""))
        paths = write_study_reports(study, rows, f"{args.output_dir}/study_{study.name}", note)
        with open(paths["md"]) as f:
            print("\n" + f.read())
        print(f"study {study.name}: {time.perf_counter() - start:.0f} s; " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
