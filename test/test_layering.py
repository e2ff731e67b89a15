"""Imports point one way (STYLE.md): the runtime (node, pipeline, backends, tools) never imports training code."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

RUNTIME = ("unet_perception.node", "unet_perception.pipeline", "unet_perception.codec",
           "unet_perception.backends.factory", "unet_perception.backends.onnxruntime",
           "unet_perception.backends.torch_backend", "unet_perception.backends.tensorrt",
           "unet_perception.tools.bag", "unet_perception.tools.demo", "unet_perception.tools.build_engine")


def test_the_runtime_never_imports_training() -> None:
    code = ("import importlib, sys\n"
            f"for name in {RUNTIME!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('unet_perception.training')))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", f"runtime modules import training code: {run.stdout.strip()}"
