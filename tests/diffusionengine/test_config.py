"""DiffusionEngine config: defaults, every check, the YAML files, and what importing loads."""
import os
import subprocess
import sys
import textwrap

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_model

from diffusiondet.config import add_diffusiondet_config
from diffusionengine import build_config
from diffusionengine.config import add_diffusionengine_config, validate_diffusionengine_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = os.path.join(ROOT, "configs", "Base-DiffusionEngine.yaml")
COCO = os.path.join(ROOT, "configs", "diffengine.coco.sd2.yaml")
DET = os.path.join(ROOT, "configs", "diffdet.synthetic.res18.yaml")
E = "MODEL.DiffusionEngine."

DEFAULTS = {
    "MODEL.DiffusionEngine": {
        "SD_PATH": "", "TIMESTEP": 1, "PROMPT": "", "EXTRA_LEVELS": 1, "LABEL_SCORE_THRESH": 0.3,
        "LABEL_NMS_THRESH": 0.5, "LABEL_MIN_SIZE": 2.0, "LABEL_MAX_PER_IMAGE": 100, "LABEL_CLASSES": (),
    },
    "DATASETS.GENERATED": {"DIRS": (), "REPEAT_FACTOR": 1.0},
}  # fmt: skip


def test_every_key_has_its_default():
    cfg = get_cfg()
    add_diffusiondet_config(cfg)
    add_diffusionengine_config(cfg)
    for node_name, expected in DEFAULTS.items():
        node = cfg
        for part in node_name.split("."):
            node = node[part]
        assert dict(node) == expected, node_name
    validate_diffusionengine_config(cfg)  # the defaults are valid


# Checks that hold for every backbone (a DiffusionDet config that does not use the SD backbone).
@pytest.mark.parametrize(
    "opts, message",
    [
        ([E + "TIMESTEP", -1], r"TIMESTEP must be in \[0, num_train_timesteps - 1\] .* got -1"),
        ([E + "EXTRA_LEVELS", -1], "EXTRA_LEVELS must be >= 0, got -1"),
        ([E + "LABEL_SCORE_THRESH", 1.5], r"LABEL_SCORE_THRESH must be in \[0, 1\], got 1.5"),
        ([E + "LABEL_NMS_THRESH", -0.1], r"LABEL_NMS_THRESH must be in \[0, 1\], got -0.1"),
        ([E + "LABEL_MIN_SIZE", -2.0], "LABEL_MIN_SIZE must be >= 0, got -2.0"),
        ([E + "LABEL_MAX_PER_IMAGE", 0], "LABEL_MAX_PER_IMAGE must be >= 1, got 0"),
        ([E + "LABEL_CLASSES", ("car", "")], r"LABEL_CLASSES must be class names, got \('car', ''\)"),
        (["DATASETS.GENERATED.REPEAT_FACTOR", 0.0], "DATASETS.GENERATED.REPEAT_FACTOR must be > 0, got 0.0"),
    ],
)
def test_general_checks(opts, message):
    with pytest.raises(ValueError, match=message):
        build_config(DET, opts)


def test_every_bad_value_is_listed_and_unknown_timestep_range_is_open():
    with pytest.raises(ValueError) as info:
        build_config(DET, [E + "EXTRA_LEVELS", -1, E + "LABEL_MAX_PER_IMAGE", 0])
    assert "EXTRA_LEVELS" in str(info.value) and "LABEL_MAX_PER_IMAGE" in str(info.value)
    # Without an SD folder the scheduler's range is unknown: any t >= 0 passes.
    assert build_config(DET, [E + "TIMESTEP", 5000]).MODEL.DiffusionEngine.TIMESTEP == 5000


@pytest.mark.parametrize(
    "opts, message",
    [
        ([E + "TIMESTEP", 1000], r"TIMESTEP must be in \[0, 999\] \(the scheduler of SD_PATH\), got 1000"),
        (["INPUT.FORMAT", "BGR"], "INPUT.FORMAT must be 'RGB' with build_stable_diffusion_backbone"),
        (["MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]], r"MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must be \[127.5"),
        (["MODEL.PIXEL_STD", [1.0, 1.0, 1.0]], r"got \[127.5, 127.5, 127.5\] and \[1.0, 1.0, 1.0\]"),
        (
            ["MODEL.FPN.OUT_CHANNELS", 48, "MODEL.DiffusionDet.HIDDEN_DIM", 48],
            "MODEL.FPN.OUT_CHANNELS must be a multiple of 32 .* got 48",
        ),
        (
            ["MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3"]],
            r"IN_FEATURES \('p2', 'p3'\) must be among the backbone's outputs \('p3', 'p4', 'p5', 'p6', 'p7'\)",
        ),
        (
            ["MODEL.ROI_HEADS.IN_FEATURES", ["p3", "p7"], E + "EXTRA_LEVELS", 0],
            r"must be among the backbone's outputs \('p3', 'p4', 'p5', 'p6'\)",
        ),
    ],
)
def test_backbone_checks(tiny_sd1_path, opts, message):
    with pytest.raises(ValueError, match=message):
        build_config(BASE, [E + "SD_PATH", tiny_sd1_path, *opts])


def test_backbone_checks_sd_path_and_one_width():
    with pytest.raises(ValueError, match="SD_PATH must name a local SD folder"):
        build_config(COCO, [])
    # DiffusionDet's own check reports HIDDEN_DIM != OUT_CHANNELS first; this one stands alone too.
    cfg = build_config(DET, [])
    cfg.MODEL.BACKBONE.NAME = "build_stable_diffusion_backbone"
    cfg.MODEL.DiffusionEngine.SD_PATH = "/some/sd"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [127.5] * 3, [127.5] * 3
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p3"]
    cfg.MODEL.FPN.OUT_CHANNELS = 96
    with pytest.raises(ValueError, match=r"HIDDEN_DIM \(64\) must equal MODEL.FPN.OUT_CHANNELS \(96\), the channel mapper"):
        validate_diffusionengine_config(cfg)
    cfg.MODEL.DiffusionDet.HIDDEN_DIM = 96
    validate_diffusionengine_config(cfg)


@pytest.mark.parametrize("path", [BASE, COCO], ids=os.path.basename)
def test_yaml_files_build_with_a_local_sd(tiny_sd2_path, path):
    cfg = build_config(path, [E + "SD_PATH", tiny_sd2_path, "MODEL.DEVICE", "cpu"])
    assert "build_stable_diffusion_backbone" in BACKBONE_REGISTRY
    assert cfg.MODEL.FPN.OUT_CHANNELS == cfg.MODEL.DiffusionDet.HIDDEN_DIM == 256
    model = build_model(cfg)
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6", "p7"]
    assert len(model.head.head_series) == cfg.MODEL.DiffusionDet.NUM_HEADS
    if path == COCO:  # the paper's schedule
        s = cfg.SOLVER
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.STEPS, s.GAMMA, s.MAX_ITER) == (64, 2e-4, (80000,), 0.1, 90000)
        assert s.OPTIMIZER == "ADAMW" and s.BACKBONE_MULTIPLIER == 1.0


def _run(code):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_packages_never_import_diffusionengine_diffusers_or_transformers():
    _run(
        """
        import sys
        import diffusiondet, diffusioninst
        import diffusiondet.config, diffusioninst.config
        heavy = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers', 'diffusionengine')]
        assert not heavy, heavy
        """
    )


def test_importing_diffusionengine_loads_neither_diffusers_nor_the_model():
    _run(
        """
        import sys
        import diffusionengine
        heavy = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')]
        heavy += [m for m in sys.modules if m.startswith(('diffusionengine.modeling', 'diffusiondet.modeling'))]
        assert not heavy, heavy
        from diffusiondet.config_extensions import config_extension
        assert config_extension('diffusionengine').registers == ('diffusionengine.modeling',)
        assert diffusionengine.tap_channels({'block_out_channels': [32, 64, 64, 64]})[8] == 192
        assert 'diffusers' not in sys.modules  # the taps need torch only
        try:
            diffusionengine.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("unknown attributes must raise AttributeError")
        """
    )
