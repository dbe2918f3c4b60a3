"""The extension seam of the config layer (diffusiondet/config_extensions.py, docs/extensions.md):
a toy package contributes a key, a check, a registration and a prepare step, and build_config
observes each, without the core naming the package."""
import sys

import pytest
from detectron2.config import CfgNode as CN

from diffusiondet.config import build_config
from diffusiondet.config_extensions import (
    ConfigExtension,
    config_extension,
    register_config_extension,
    unregister_config_extension,
)
from diffusioninst import build_config as build_inst_config

CONFIG = "configs/diffdet.synthetic.res18.yaml"

# The toy package: importing it registers the extension, as diffusioninst/config.py does. Its
# "heavy" module records that it was imported, standing in for a model that registers itself.
TOY_PACKAGE = '''
from detectron2.config import CfgNode as CN
from diffusiondet.config_extensions import register_config_extension

prepared = []

def add_toy_config(cfg):
    cfg.MODEL.TOY = CN()
    cfg.MODEL.TOY.SIZE = 3
    # Added after the core's keys, so it may read them.
    cfg.MODEL.TOY.PROPOSALS_SEEN = cfg.MODEL.DiffusionDet.NUM_PROPOSALS

def validate_toy_config(cfg):
    if cfg.MODEL.TOY.SIZE < 1:
        raise ValueError(f"MODEL.TOY.SIZE must be >= 1, got {cfg.MODEL.TOY.SIZE}")

def prepare_toy(cfg):
    prepared.append(cfg.MODEL.TOY.SIZE)

register_config_extension(
    "toy_extension",
    add_config=add_toy_config,
    validate=validate_toy_config,
    registers=("toy_extension.heavy",),
    prepare="toy_extension:prepare_toy",
)
'''


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    package = tmp_path / "toy_extension"
    package.mkdir()
    (package / "__init__.py").write_text(TOY_PACKAGE)
    (package / "heavy.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    unregister_config_extension("toy_extension")
    for name in [m for m in sys.modules if m == "toy_extension" or m.startswith("toy_extension.")]:
        del sys.modules[name]


def test_a_named_extension_is_imported_and_adds_keys_checks_and_registrations(toy_package):
    assert "toy_extension" not in sys.modules
    cfg = build_config(CONFIG, ["MODEL.TOY.SIZE", 5], extensions=("toy_extension",))
    # Its key exists and the override reached it; it read the core's default (keys are all added
    # before the YAML file, which sets 100, is merged).
    assert cfg.MODEL.TOY.SIZE == 5
    assert cfg.MODEL.TOY.PROPOSALS_SEEN == 300 and cfg.MODEL.DiffusionDet.NUM_PROPOSALS == 100
    assert "toy_extension.heavy" in sys.modules
    assert sys.modules["toy_extension"].prepared == [5]


def test_the_extensions_check_runs_before_its_registrations(toy_package):
    with pytest.raises(ValueError, match="MODEL.TOY.SIZE must be >= 1, got 0"):
        build_config(CONFIG, ["MODEL.TOY.SIZE", 0], extensions=("toy_extension",))
    assert "toy_extension.heavy" not in sys.modules
    assert sys.modules["toy_extension"].prepared == []


def test_an_extension_not_named_contributes_nothing(toy_package):
    # Registered (imported) but not named: a build must not depend on what else was imported.
    config_extension("toy_extension")
    cfg = build_config(CONFIG)
    assert "TOY" not in cfg.MODEL
    with pytest.raises(KeyError, match="MODEL.TOY.SIZE"):
        build_config(CONFIG, ["MODEL.TOY.SIZE", 2])


def test_extensions_compose_after_diffusioninst_each_once(toy_package):
    cfg = build_inst_config(CONFIG, extensions=("toy_extension", "diffusioninst", "toy_extension"))
    assert "DiffusionInst" in cfg.MODEL and cfg.MODEL.TOY.SIZE == 3
    assert sys.modules["toy_extension"].prepared == [3]


def test_an_extension_object_needs_no_package():
    seen = []

    def add(cfg):
        cfg.ADHOC = CN()
        cfg.ADHOC.FLAG = False

    def validate(cfg):
        seen.append(cfg.ADHOC.FLAG)

    extension = ConfigExtension("adhoc", add_config=add, validate=validate, prepare=lambda cfg: seen.append("prepared"))
    cfg = build_config(CONFIG, ["ADHOC.FLAG", True], extensions=(extension,))
    assert cfg.ADHOC.FLAG is True and seen == [True, "prepared"]


def test_mistakes_in_naming_an_extension_are_reported(tmp_path, monkeypatch):
    (tmp_path / "registers_nothing.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(LookupError, match="registered no config extension"):
            build_config(CONFIG, extensions=("registers_nothing",))
    finally:
        sys.modules.pop("registers_nothing", None)
    with pytest.raises(ModuleNotFoundError):
        build_config(CONFIG, extensions=("no_such_extension_package",))
    with pytest.raises(TypeError, match="sequence of module names"):
        register_config_extension("bad", registers="diffusiondet.modeling")
    bad_prepare = ConfigExtension("bad_prepare", prepare="diffusiondet.modeling")
    with pytest.raises(ValueError, match="'module:function'"):
        build_config(CONFIG, extensions=(bad_prepare,))
