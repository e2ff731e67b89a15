"""Type-check the GPU backends against the TensorRT 10 type stubs: API misuse fails here, without a GPU.

``tensorrt-stubs`` installs ``tensorrt/__init__.pyi`` without a ``py.typed`` marker (mypy then skips it) and
its generated ``tensorrt_bindings/tensorrt.pyi`` has a few signatures that are not valid Python (parameters
named ``in``, a required parameter after defaulted ones). ``stub_dir`` writes a repaired copy to a temporary
folder and points ``mypy_path`` at it; errors inside the stubs themselves are ignored, ours are not.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

CHECKED = ["unet_perception/backends/tensorrt.py", "unet_perception/backends/tensorrt_builder.py",
           "unet_perception/backends/engine_cache.py", "unet_perception/backends/cache_trust.py",
           "unet_perception/backends/precision_onnx.py",
           "unet_perception/backends/cuda_memory.py", "unet_perception/backends/torch_backend.py",
           "unet_perception/tools/build_engine.py"]
SIGNATURE = re.compile(r"(\s*def \w+\()(.*)(\)(?: -> .*)?:\s*)$")


def split_params(params: str) -> list[str]:
    """Split a parameter list at top-level commas (not those inside brackets)."""
    out, depth, current = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    return [*out, current]


def repair_signature(line: str) -> str:
    """Rename parameters called ``in``/``from``; give a default to required parameters after defaulted ones."""
    m = SIGNATURE.match(line)
    if not m:
        return line
    params = [re.sub(r"^(\s*)(in|from)(?=:)", r"\1\2_", p) for p in split_params(m.group(2))]
    seen_default = False
    for i, param in enumerate(params):
        if param.strip().startswith("*"):
            break
        if "=" in param:
            seen_default = True
        elif seen_default and param.strip():
            params[i] = param + " = ..."
    return m.group(1) + ",".join(params) + m.group(3)


def test_repair_signature() -> None:
    assert repair_signature("    def f(self, in: list[int], out: int) -> int:") == \
        "    def f(self, in_: list[int], out: int) -> int:"
    assert repair_signature("    def g(self, a: W = None, b: dict[str, int] = {}, c: int) -> X:") == \
        "    def g(self, a: W = None, b: dict[str, int] = {}, c: int = ...) -> X:"
    assert repair_signature("x = 1") == "x = 1"


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        pytest.fail("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (see the Makefile)")
    site = Path(spec.origin).parents[1]
    out = tmp_path_factory.mktemp("trt_stubs")
    for rel in ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        text = (site / rel).read_text()
        (out / rel).write_text("\n".join(repair_signature(line) for line in text.splitlines()) + "\n")
    return out


def run_mypy(stubs: Path, files: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    config = tmp / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {stubs}\nfollow_imports = silent\nignore_missing_imports = True\n"
                      "disallow_untyped_defs = True\nwarn_unused_ignores = True\nno_implicit_optional = True\n"
                      "[mypy-tensorrt,tensorrt_bindings.*]\nignore_errors = True\n")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(stubs / ".mypy_cache"),
           "--no-error-summary", *files]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_backends_typecheck_against_tensorrt_stubs(stub_dir: Path, tmp_path: Path) -> None:
    result = run_mypy(stub_dir, CHECKED, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_misspelled_tensorrt_api_fails(stub_dir: Path, tmp_path: Path) -> None:
    """Guards the check above: if the stubs were not seen, every TensorRT name would be Any and pass silently."""
    bad = tmp_path / "bad_build.py"
    bad.write_text("import tensorrt as trt\n\n\n"
                   "def build(network: trt.INetworkDefinition) -> None:\n"
                   "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "    config = builder.create_builder_config()\n"
                   "    builder.build_serialised_network(network, config)\n")
    result = run_mypy(stub_dir, [str(bad)], tmp_path)
    assert result.returncode != 0
    assert "build_serialised_network" in result.stdout and "build_serialized_network" in result.stdout, result.stdout
