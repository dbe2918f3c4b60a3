"""The import direction of the style guide: tools -> diffusioninst -> diffusiondet -> detectron2.

Read statically (``ast``), so a forbidden import is caught even in a branch no test executes.
``diffusiondet/diffusion`` is the pure-torch diffusion math shared by both detectors: standard
library and torch only. ``diffusiondet/config.py`` only reads and checks a cfg and must not pull
in the model code.
"""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_files(package):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imported_modules(path):
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            names.append(prefix)
            # "from . import x" imports the submodule x
            names += [f"{prefix}.{alias.name}" for alias in node.names if not node.module]
    return names


def _top(name):
    return name.split(".")[0]


def _violations(package, allowed):
    found = []
    for path in _python_files(package):
        for name in imported_modules(path):
            if not allowed(name):
                found.append(f"{os.path.relpath(path, ROOT)} imports {name}")
    return found


def test_diffusiondet_never_imports_diffusioninst_or_tools():
    assert _violations("diffusiondet", lambda n: _top(n) not in ("diffusioninst", "tools")) == []


def test_diffusioninst_never_imports_tools():
    if not os.path.isdir(os.path.join(ROOT, "diffusioninst")):
        pytest.fail("diffusioninst/ is missing")
    assert _violations("diffusioninst", lambda n: _top(n) != "tools") == []


def test_diffusion_math_imports_torch_and_the_standard_library_only():
    def allowed(name):
        return (
            _top(name) in sys.stdlib_module_names
            or _top(name) == "torch"
            or name.startswith("diffusiondet.diffusion")
        )

    assert _violations(os.path.join("diffusiondet", "diffusion"), allowed) == []


def test_config_does_not_import_the_model_code():
    path = os.path.join(ROOT, "diffusiondet", "config.py")
    assert [n for n in imported_modules(path) if n.startswith("diffusiondet.modeling")] == []


def test_the_checker_sees_relative_and_forbidden_imports(tmp_path, monkeypatch):
    # Guards the checker itself: a planted upward import must be reported.
    package = tmp_path / "diffusiondet" / "diffusion"
    package.mkdir(parents=True)
    (package / "bad.py").write_text(
        "from ..modeling import meta_arch\nimport detectron2\nfrom . import schedule\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", str(tmp_path))
    names = imported_modules(str(package / "bad.py"))
    assert names == [
        "diffusiondet.modeling",
        "detectron2",
        "diffusiondet.diffusion",
        "diffusiondet.diffusion.schedule",
    ]
