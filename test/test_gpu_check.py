"""The GPU check (`make gpu-check`) and benchmarks/gpu.py on a machine without a GPU: every GPU check is a named
SKIP and the exit status is 0; a failing check, or a GPU the kernel shows but CUDA cannot use, makes it 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu  # noqa: E402
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs for real")
def test_without_a_gpu_everything_is_a_named_skip(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--iterations", "1"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    rows = table[1:]
    assert len(rows) >= 6 and all("| SKIP |" in row for row in rows), rows
    assert all(row.split("|")[4].strip() for row in rows)  # each skip says what is missing


def test_a_failing_check_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str:
        raise RuntimeError("loss is nan")

    monkeypatch.setattr(gpu_check, "check_amp_training", broken)
    assert gpu_check.main(["--iterations", "1"]) == 1
    out = capsys.readouterr().out
    assert "| amp training steps | FAIL |" in out and "RuntimeError: loss is nan" in out and "1 failed" in out


def test_a_visible_gpu_that_torch_cannot_use_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("unet_perception.backends.cuda_memory.gpu_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(gpu_check.Skip, match="is a CPU build"):
        gpu_check.require_cuda_torch()

    def old_driver() -> None:
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040)")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", old_driver)
    with pytest.raises(RuntimeError, match="a GPU is visible but torch \\(CUDA 12.8\\) cannot use it: The NVIDIA "
                                           "driver on your system is too old"):
        gpu_check.require_cuda_torch()
    monkeypatch.setattr("unet_perception.backends.cuda_memory.gpu_visible", lambda: False)
    with pytest.raises(gpu_check.Skip, match="no CUDA GPU"):
        gpu_check.require_cuda_torch()


def test_benchmark_fails_on_a_broken_gpu_and_skips_what_is_missing(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--models", str(tiny_model), "--iterations", "1", "--warmup", "0", "--batches", "1",
            "--only", "tensorrt fp32", "ort-cpu fp32"]
    assert gpu.main(args) == 0
    out = capsys.readouterr().out
    assert "| ort-cpu fp32 | tiny_camvid.onnx | cpu | 1 |" in out and "not run here:" in out

    module: Any = gpu.backend_module("tensorrt")
    monkeypatch.setattr(module, "unavailable_reason", lambda options: "CUDA error during cudaGetDeviceCount: "
                        "cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA runtime version)")
    monkeypatch.setattr(gpu, "gpu_visible", lambda: True)
    assert gpu.main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED:\n- tensorrt fp32 (tiny_camvid.onnx): CUDA error" in out
    monkeypatch.setattr(gpu, "gpu_visible", lambda: False)  # the same reason without a GPU: nothing to use
    assert gpu.main(args) == 0


def test_benchmark_row_that_raises_fails_the_run(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("execute failed")

    monkeypatch.setattr(gpu, "create_backend", broken)
    assert gpu.main(["--models", str(tiny_model), "--iterations", "1", "--only", "ort-cpu fp32"]) == 1
    assert "- ort-cpu fp32 (tiny_camvid.onnx): RuntimeError: execute failed" in capsys.readouterr().out


def test_a_missing_library_is_a_named_skip_but_our_own_import_errors_fail() -> None:
    def needs(name: str) -> Any:
        def check() -> str:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return check

    result = gpu_check.run_check("x", needs("onnxruntime"))
    assert (result.status, result.detail) == ("SKIP", "python package 'onnxruntime' is not installed")
    assert gpu_check.run_check("y", needs("unet_perception.nope")).status == "FAIL"


def test_parity_and_speed_logic_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity check's own code, run on the CPU (fp32 only: fp16 autocast is CUDA's): it must pass torch against
    ONNX Runtime on a random-weight model, and fail when the threshold cannot be met."""
    model = gpu_check.random_seed_model(tmp_path, width=4)
    frames, what = gpu_check.camera_frames(tmp_path / "no-frames", 2)
    monkeypatch.setattr(gpu_check, "PARITY", {"fp32": 0.999})
    detail = gpu_check.torch_parity_and_speed(model, frames, what, 1, trained=False, device="cpu")
    assert detail.startswith("random_seed_unet.onnx on 2 random frames: fp32: ") and "640x480 batch 1: " in detail
    monkeypatch.setattr(gpu_check, "PARITY", {"fp32": 1.01})  # unreachable: the check must fail
    with pytest.raises(AssertionError, match="fp32 agreement .* < 101.0%"):
        gpu_check.torch_parity_and_speed(model, frames, what, 1, trained=False, device="cpu")
