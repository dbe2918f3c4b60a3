"""One set of versions: the pins of tools/bootstrap_env.sh (what `make env` installs) are the ones
setup.py declares and requirements-dev.txt lists, so a pip install gets the tested stack."""
import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bootstrap_requirements(kind):
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "bootstrap_env.sh"), "--print-requirements", kind],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return result.stdout.split()


def setup_py_constant(name):
    """The literal assigned to ``name`` in setup.py (read, not run: running it calls setup())."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py assigns no {name}")


def requirements_file(path):
    with open(os.path.join(ROOT, path)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def test_setup_py_requires_the_bootstrap_runtime_pins():
    assert setup_py_constant("INSTALL_REQUIRES") == bootstrap_requirements("runtime")
    # The packages the set-up script installs without their dependencies: an extra (see setup.py).
    assert setup_py_constant("EXTRAS_REQUIRE")["lvis"] == bootstrap_requirements("nodeps")
    # The ONNX exporter and runtime: an extra of setup.py that `make env` installs for the tests.
    assert setup_py_constant("EXTRAS_REQUIRE")["export"] == bootstrap_requirements("export")


def test_requirements_dev_lists_the_bootstrap_dev_pins():
    dev = bootstrap_requirements("dev")
    assert requirements_file("requirements-dev.txt") == dev
    # Pinned exactly, so that `make env` and a pip install run the same test and lint tools.
    assert all("==" in requirement for requirement in dev), dev
    assert {r.split("==")[0] for r in dev} >= {"pytest", "pytest-timeout", "import-linter", "mutmut"}
