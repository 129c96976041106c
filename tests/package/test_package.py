"""The installable package: the wheel holds ``obsnet`` only, its entry points run, and the
import graph of ``obsnet`` has no cycle and reaches neither tests nor benchmarks."""
import ast
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tests.helpers import ROOT
from tests.helpers.runner import python


PACKAGE = ROOT / "obsnet"
# left out of the copy the wheel is built from: build outputs anywhere, run outputs at the top
NOT_COPIED = shutil.ignore_patterns("*.egg-info", "__pycache__", ".pytest_cache")
NOT_COPIED_AT_TOP = {".git", ".venv", "build", "dist", "data", "ckpt", "logs", "runs"}


def missing_build_tool() -> str | None:
    """Why the wheel cannot be built offline here, or None: setuptools 70.1 or later builds
    wheels by itself, an older one needs the ``wheel`` package."""
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (pip wheel --no-build-isolation needs it)"
    import setuptools
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} needs the wheel package, which is not installed"
    return None


def ignore(folder, names) -> set[str]:
    """What ``shutil.copytree`` leaves out of ``folder`` when copying the repository."""
    top = NOT_COPIED_AT_TOP if Path(folder) == ROOT else set()
    return set(NOT_COPIED(folder, names)) | (top & set(names))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel ``pip wheel --no-deps --no-build-isolation`` builds from a copy of the
    repository (tests and benchmarks included, so that leaving them out is checked), offline."""
    reason = missing_build_tool()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=ignore, symlinks=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "--disable-pip-version-check", ".", "-w", str(tmp / "dist")]
    out = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    [built] = (tmp / "dist").glob("obsnet-*.whl")
    return built


def test_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    files = sorted(set(names) - set(dist_info))
    assert files and all(n.startswith("obsnet/") for n in files), files
    assert {"obsnet/__init__.py", "obsnet/__main__.py", "obsnet/cli.py", "obsnet/check.py",
            "obsnet/paste.py", "obsnet/data/loaders.py", "obsnet/models/checkpoint.py",
            "obsnet/models/registry.py"} <= set(files)
    assert {n for n in files if n.endswith(".py")} == \
        {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")}


def test_wheel_declares_the_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    [entry_points] = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
    lines = archive.read(entry_points).decode().splitlines()
    assert "[console_scripts]" in lines
    assert "obsnet = obsnet.cli:console_main" in lines


@pytest.mark.parametrize("module, usage", [("obsnet", "usage: python -m obsnet "),
                                           ("obsnet.check", "usage: python -m obsnet.check "),
                                           ("obsnet.paste", "usage: python -m obsnet.paste "),
                                           ("obsnet.synthetic", "usage: python -m obsnet.synthetic ")])
def test_python_m_help(module, usage):
    out = python("-m", module, "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(usage), out.stdout[:200]


def test_console_script_names_itself(monkeypatch, capsys):
    from obsnet import cli
    monkeypatch.setattr(sys, "argv", ["obsnet", "--seed", "-5"])
    assert cli.console_main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "obsnet: error: --seed must be -1 (not seeded) or in 0..4294967295 (got -5)"


def module_name(path) -> str:
    """``obsnet/models/segnet.py`` -> ``obsnet.models.segnet``; a package's ``__init__`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, modules: set[str]) -> set[str]:
    """The top-level names and ``obsnet`` modules (of ``modules``) that ``path`` imports,
    at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return {name for name in found if name in modules or not name.startswith("obsnet")}


def import_graph() -> dict[str, set[str]]:
    """obsnet module -> the obsnet modules it imports (packages' empty ``__init__`` left out)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    return {name: {m for m in found if m in files and files[m].name != "__init__.py"}
            for name, found in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path (first module repeated last), or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["obsnet.models.registry"] >= {"obsnet.models.checkpoint", "obsnet.models.segnet"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    assert not graph["obsnet.models.checkpoint"] & {m for m in graph if m.startswith("obsnet.models.")}


# The leaves every layer may use: errors, atomic writes, output ownership (they import only
# each other). The data and model layers import nothing else above them: no command line.
LEAVES = {"obsnet.errors", "obsnet.outputs", "obsnet.ownership"}
LOWER_LAYERS = ("obsnet.data.", "obsnet.models.")


def test_leaves_import_only_leaves():
    graph = import_graph()
    for leaf in LEAVES:
        assert graph[leaf] <= LEAVES, (leaf, graph[leaf] - LEAVES)


def test_data_and_models_do_not_import_upwards():
    graph = import_graph()
    for module, imported in graph.items():
        if module.startswith(LOWER_LAYERS):
            upwards = {m for m in imported if not m.startswith(LOWER_LAYERS)} - LEAVES
            assert not upwards, (module, upwards)


def test_command_lines_live_outside_data_and_models():
    for path in (PACKAGE / "data").rglob("*.py"), (PACKAGE / "models").rglob("*.py"):
        for file in path:
            text = file.read_text()
            assert "import argparse" not in text and "def main(" not in text, file


def test_the_package_imports_neither_tests_nor_benchmarks():
    project_only = {"tests", "benchmarks", "conftest", "cli", "main", "inference", "Utils", "Models",
                    "Dataset", "stages", "train", "evaluation"}
    for path in PACKAGE.rglob("*.py"):
        found = {name.split(".")[0] for name in imported_modules(path, set())}
        assert not found & project_only, (path, found & project_only)


def test_checkpoint_module_alone_imports_no_network(tmp_path):
    """In a fresh interpreter: ``import obsnet`` imports no submodule, and the checkpoint module
    imports no network module (the networks import it, not the other way round)."""
    code = ("import sys; import obsnet; print(sorted(m for m in sys.modules if m.startswith('obsnet.')));"
            " import obsnet.models.checkpoint;"
            " print(sorted(m for m in sys.modules if m.startswith('obsnet.models.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    after_package, after_checkpoint = out.stdout.splitlines()
    assert after_package == "[]"
    assert after_checkpoint == "['obsnet.models.checkpoint']"
