"""The paper's ablations (DiffusionDet §4.4, Tables 4a, 4b, 4c, 5 and 6) as studies on the
synthetic set: which models to train, how to evaluate them, and the paper's numbers beside them.

An arm changes the main job's config (configs/diffdet.synthetic.res18.yaml) by the same keys as
the COCO ablation configs of configs/ablations/ (tests/test_ablation_studies.py checks that they
agree). Runner and reports: diffusiondet/tooling/ablation.py; results: docs/ablations.md.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["Arm", "Column", "MAIN_JOB_SEEDS", "RECIPE", "STUDIES", "Study", "get_study"]

# The CPU recipe of a study's training: the main job's, halved (300 iterations, the learning-rate
# step at 250 instead of 600 / 500), so that a 12-training study (Table 4a, 3 seeds) took 51
# minutes on 2 cores (docs/ablations.md, Results). Everything else is the main job's config.
RECIPE = ("SOLVER.MAX_ITER", 300, "SOLVER.STEPS", (250,))

# Training seeds, the first k of them for a study of k seeds: the main job's SEED first, then the
# seeds of the README's seed spread (`run_main_job.py --seeds 40244023 1 2`).
MAIN_JOB_SEEDS = (40244023, 1, 2)

_D = "MODEL.DiffusionDet."


@dataclass(frozen=True)
class Column:
    """One number of a table row: ``metric`` ("AP", "AP50", "AP75", or "images/s": evaluation
    throughput, backbone included) at ``steps`` sampling steps with ``boxes`` boxes; None takes
    the arm's own steps / boxes (Table 6, where the arms are evaluation settings)."""

    label: str
    metric: str = "AP"
    steps: Optional[int] = None
    boxes: Optional[int] = None


@dataclass(frozen=True)
class Arm:
    """A row: ``train`` config overrides of its models (KEY, VALUE, ...; () = the recipe as is),
    ``evaluate`` inference-only overrides (Table 4c), the arm's own ``steps`` / ``boxes`` for
    columns that leave them open, and the paper's numbers ({column label: value}; a column the
    paper has no number for is left out)."""

    name: str
    train: Tuple = ()
    evaluate: Tuple = ()
    steps: Optional[int] = None
    boxes: Optional[int] = None
    paper: Dict[str, float] = field(default_factory=dict)
    default: bool = False  # the main job's own setting (bold in the tables)


@dataclass(frozen=True)
class Study:
    """``seeds`` models per arm (the first of MAIN_JOB_SEEDS), or with ``single_model`` one model
    of the recipe as is (an evaluation-only study); each model evaluated with ``sampling_seeds``
    noise seeds (its training seed, +1, ...)."""

    name: str
    title: str
    arms: Tuple[Arm, ...]
    columns: Tuple[Column, ...]
    seeds: int = 3
    sampling_seeds: int = 1
    single_model: bool = False
    claim: str = ""  # the paper's claim that the study checks

    def cells(self, arm: Arm):
        """(column, steps, boxes) of every number of ``arm``'s row."""
        return [(c, c.steps or arm.steps, c.boxes or arm.boxes) for c in self.columns]

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ValueError(f"study {self.name} has no arm {name!r}; its arms: {[a.name for a in self.arms]}")


def _ap3(ap, ap50, ap75):
    return {"AP 1@300": ap, "AP50 1@300": ap50, "AP75 1@300": ap75}


_AP3_COLUMNS = (Column("AP 1@300", "AP", 1, 300), Column("AP50 1@300", "AP50", 1, 300),
                Column("AP75 1@300", "AP75", 1, 300), Column("AP 4@300", "AP", 4, 300))

_4A = Study(
    "4a", "Table 4a: signal scale",
    arms=(Arm("0.1", (_D + "SNR_SCALE", 0.1), paper=_ap3(38.9, 54.3, 42.1)),
          Arm("1.0", (_D + "SNR_SCALE", 1.0), paper=_ap3(45.0, 63.0, 48.9)),
          Arm("2.0", (), paper=_ap3(45.8, 64.1, 50.4), default=True),
          Arm("3.0", (_D + "SNR_SCALE", 3.0), paper=_ap3(45.6, 63.9, 50.0))),
    columns=_AP3_COLUMNS,
    claim="a signal scale of 2.0 is best; 0.1 (the image-generation default) loses about 7 AP",
)

_4B = Study(
    "4b", "Table 4b: GT boxes padding",
    arms=(Arm("Repeat", (_D + "PADDING", "repeat"), paper=_ap3(44.2, 62.0, 48.3)),
          Arm("Cat Gaussian", (), paper=_ap3(45.8, 64.1, 50.4), default=True),
          Arm("Cat Uniform", (_D + "PADDING", "uniform_concat"), paper=_ap3(45.2, 63.3, 49.3)),
          Arm("Cat Full", (_D + "PADDING", "full_image_concat"), paper=_ap3(45.7, 63.9, 49.9))),
    columns=_AP3_COLUMNS, seeds=1,
    claim="concatenating Gaussian boxes is best; repeating the ground truth is worst (-1.6 AP)",
)


def _steps3(ap1, ap2, ap3):
    return {"1 step": ap1, "2 steps": ap2, "3 steps": ap3}


_4C = Study(
    "4c", "Table 4c: DDIM and box renewal (AP at 1 / 2 / 3 sampling steps, 300 boxes)",
    arms=(Arm("no DDIM, no renewal", evaluate=(_D + "SAMPLER_UPDATE", "x0", _D + "BOX_RENEWAL", False),
              paper=_steps3(45.8, 44.4, 44.1)),
          Arm("DDIM, no renewal", evaluate=(_D + "BOX_RENEWAL", False), paper=_steps3(45.8, 46.0, 46.1)),
          Arm("no DDIM, renewal", evaluate=(_D + "SAMPLER_UPDATE", "x0"), paper=_steps3(45.8, 46.3, 46.3)),
          Arm("DDIM, renewal", paper=_steps3(45.8, 46.5, 46.6), default=True)),
    columns=(Column("1 step", "AP", 1, 300), Column("2 steps", "AP", 2, 300), Column("3 steps", "AP", 3, 300)),
    seeds=1, sampling_seeds=3, single_model=True,
    claim="with DDIM and box renewal AP rises with the steps; without either it falls",
)


def _eval_boxes(paper_row: Sequence[Optional[float]]):
    return {f"{n} boxes": v for n, v in zip((50, 100, 300, 1000), paper_row) if v is not None}


_5 = Study(
    "5", "Table 5: training boxes (rows) × evaluation boxes (columns), AP at 1 step",
    arms=(Arm("50", (_D + "NUM_PROPOSALS", 50), paper={}),
          Arm("100", (), paper=_eval_boxes((None, 42.9, 44.4, 44.6)), default=True),
          Arm("300", (_D + "NUM_PROPOSALS", 300), paper=_eval_boxes((None, 42.8, 45.7, 46.3)))),
    columns=tuple(Column(f"{n} boxes", "AP", 1, n) for n in (50, 100, 300, 1000)),
    claim="more evaluation boxes help every model, most where training used as many; "
          "evaluating with fewer boxes than trained costs AP",
)

_6 = Study(
    "6", "Table 6: refinement stages × sampling steps, and 1000 boxes (one model, 4 stages)",
    arms=(Arm("4×1 (1 step, 300 boxes)", steps=1, boxes=300, paper={"AP": 45.8, "images/s": 30}, default=True),
          # As configs/ablations/table6_stages_steps/stages6.steps2.yaml: both steps' calls feed the ensemble.
          Arm("4×2 (2 steps, 300 boxes)", evaluate=(_D + "ENSEMBLE", "all_steps"), steps=2, boxes=300,
              paper={"AP": 46.5, "images/s": 20}),
          Arm("4×1, 1000 boxes", steps=1, boxes=1000, paper={"AP": 46.8, "images/s": 24})),
    columns=(Column("AP"), Column("AP50", "AP50"), Column("AP75", "AP75"), Column("images/s", "images/s")),
    seeds=1, sampling_seeds=3, single_model=True,
    claim="a second sampling step (6×2) or 1000 boxes buys about 1 AP for a third of the speed",
)

STUDIES: Dict[str, Study] = {s.name: s for s in (_4A, _4B, _4C, _5, _6)}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; the studies: {', '.join(STUDIES)}")
    return STUDIES[name]
