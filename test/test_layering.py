"""Imports point one way (STYLE.md): the runtime (node, pipeline, backends, tools) never imports training code, and
``unet-bag``'s layers go cli (``tools/bag_cli.py``) -> fleet (``unet_perception/fleet``) -> one-bag tool
(``tools/bag.py``, ``tools/bag_preflight.py``, the other ``tools/bag_*.py``)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

RUNTIME = ("unet_perception.node", "unet_perception.pipeline", "unet_perception.codec",
           "unet_perception.backends.factory", "unet_perception.backends.onnxruntime",
           "unet_perception.backends.torch_backend", "unet_perception.backends.tensorrt",
           "unet_perception.tools.bag", "unet_perception.tools.demo", "unet_perception.tools.build_engine")
PACKAGE = Path(REPO) / "unet_perception"
ONE_BAG = tuple(p for p in sorted((PACKAGE / "tools").glob("bag*.py")) if p.name != "bag_cli.py")  # bag, bag_read...
FLEET = tuple(sorted((PACKAGE / "fleet").glob("*.py")))
CLI = "unet_perception.tools.bag_cli"


def test_the_runtime_never_imports_training() -> None:
    code = ("import importlib, sys\n"
            f"for name in {RUNTIME!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('unet_perception.training')))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", f"runtime modules import training code: {run.stdout.strip()}"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a lazy import is still a dependency)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from package import module
    return names


def _offending(paths: tuple[Path, ...], banned: tuple[str, ...]) -> dict[str, list[str]]:
    found = {p.name: sorted(n for n in _imported(p) if any(n == b or n.startswith(b + ".") for b in banned))
             for p in paths}
    return {name: names for name, names in found.items() if names}


def test_the_one_bag_tool_knows_neither_the_fleet_nor_the_cli() -> None:
    assert len(FLEET) >= 3 and len(ONE_BAG) >= 2, f"the modules moved: {FLEET}, {ONE_BAG}"
    assert _offending(ONE_BAG, ("unet_perception.fleet", CLI)) == {}


def test_the_fleet_never_imports_the_cli() -> None:
    assert _offending(FLEET, (CLI,)) == {}
