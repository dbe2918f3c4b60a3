"""What the import contracts of setup.cfg (checked by ``lint-imports`` in ``make test``) cannot say.

import-linter forbids named modules; it has no allow-list, so "the diffusion math imports torch
and the standard library only" is checked here on the same graph (grimp, import-linter's engine).
The contracts are read statically; the subprocess tests check what actually gets imported, and
that the registrations the lazy package ``__init__`` no longer performs happen where needed.
"""
import os
import subprocess
import sys
import textwrap

import grimp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imports_beyond_torch_and_stdlib(package):
    """``(module, imported)`` pairs where a module of ``package`` imports something other than the
    standard library, torch, or ``package`` itself."""
    graph = grimp.build_graph(package.split(".")[0], include_external_packages=True, cache_dir=None)
    modules = graph.find_descendants(package) | {package}
    found = []
    for module in sorted(modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            top = imported.split(".")[0]
            inside = imported == package or imported.startswith(package + ".")
            if not (inside or top == "torch" or top in sys.stdlib_module_names):
                found.append((module, imported))
    return found


def test_diffusion_math_imports_torch_and_the_standard_library_only():
    assert imports_beyond_torch_and_stdlib("diffusiondet.diffusion") == []


def test_the_allow_list_check_sees_relative_and_outside_imports(tmp_path, monkeypatch):
    # Guards the check itself: a planted relative import of a sibling layer and a third-party
    # import must both be reported; torch, the standard library and the package's own modules not.
    math = tmp_path / "planted" / "math"
    math.mkdir(parents=True)
    (tmp_path / "planted" / "__init__.py").write_text("")
    (tmp_path / "planted" / "model.py").write_text("")
    (math / "__init__.py").write_text("from . import step\n")
    (math / "step.py").write_text("import math\nimport torch\nfrom .. import model\nimport numpy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert imports_beyond_torch_and_stdlib("planted.math") == [
        ("planted.math.step", "numpy"),
        ("planted.math.step", "planted.model"),
    ]


def _run(code):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_imports_no_model_and_build_config_registers_what_configs_name():
    # A fresh interpreter: in the test process the model is long imported.
    _run(
        """
        import sys

        import diffusiondet.config
        loaded = lambda prefix: sorted(m for m in sys.modules if m == prefix or m.startswith(prefix + "."))
        for heavy in ("diffusiondet.modeling", "diffusiondet.data", "diffusiondet.engine", "diffusioninst"):
            assert not loaded(heavy), (heavy, loaded(heavy))
        import diffusioninst
        assert not loaded("diffusiondet.modeling") and not loaded("diffusioninst.modeling")

        # The core alone registers its own names, and no extension's.
        cfg = diffusiondet.config.build_config("configs/diffdet.synthetic.res18.yaml")
        from detectron2.data import DatasetCatalog
        from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY
        assert "DiffusionDet" in META_ARCH_REGISTRY and "DiffusionInst" not in META_ARCH_REGISTRY
        assert "build_swintransformer_fpn_backbone" in BACKBONE_REGISTRY and "build_timm_fpn_backbone" in BACKBONE_REGISTRY
        assert {"synthetic_crowd_train", "synthetic_crowd_val"} <= set(DatasetCatalog.list())
        assert set(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST) <= set(DatasetCatalog.list())
        assert not loaded("diffusioninst.modeling")

        diffusioninst.build_config("configs/diffinst.synthetic.res18.yaml")
        assert "DiffusionInst" in META_ARCH_REGISTRY
        """
    )


def test_package_attributes_and_the_trainer_still_bring_the_model():
    # What `import diffusiondet` did eagerly before it became lazy: the names still resolve, and
    # a Trainer user (who may build the config by hand) finds the meta-architecture registered.
    _run(
        """
        import sys

        import diffusiondet, diffusioninst
        assert "diffusiondet.modeling" not in sys.modules
        from diffusiondet.engine import Trainer
        from detectron2.modeling import META_ARCH_REGISTRY
        assert "DiffusionDet" in META_ARCH_REGISTRY
        from diffusiondet.modeling.meta_arch import DiffusionDet
        assert diffusiondet.DiffusionDet is DiffusionDet
        assert diffusiondet.data.SYNTHETIC_CROWD_CLASSES
        assert diffusioninst.DiffusionInst is sys.modules["diffusioninst.modeling.meta_arch"].DiffusionInst
        try:
            diffusiondet.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("unknown attributes must raise AttributeError")
        """
    )
