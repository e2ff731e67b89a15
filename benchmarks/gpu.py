"""Inference latency and throughput per backend, device and precision, on the shipped models.

    python benchmarks/gpu.py [--models models/unet_camvid.onnx] [--batches 1 4] [--iterations 200]
                             [--only "tensorrt fp16" ...] [--cache-dir /tmp/engines]

Times ``backend.infer`` at the model's input size (host uint8 in, host labels and confidence out: copies
included, resize and colouring not) after a warm-up; engine builds and fp16 conversions happen before the timing.
Rows: TensorRT fp32/fp16/int8 (int8 = the model's ``_int8.onnx`` Q/DQ twin), ONNX Runtime CUDA fp32/fp16, torch
CUDA fp32/fp16 autocast (the ``.pt`` beside the model), and the CPU rows for reference. Prints a Markdown table.

Rows this machine cannot run for lack of a library, a GPU or a file are listed as not run, with the reason.
Exit status 1 when a row fails: it raised, or a GPU is visible and the row could not use it (a CUDA error, a
too-old driver, torch built for CUDA that sees no GPU).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unet_perception.backends.base import Backend, BackendError
from unet_perception.backends.cuda_memory import gpu_visible
from unet_perception.backends.factory import BackendOptions, backend_module, create_backend
from unet_perception.backends.precision_onnx import int8_model_for
from unet_perception.backends.torch_backend import checkpoint_path
from unet_perception.model_contract import ModelInfo, read_model_info

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = [REPO / "models" / "unet_camvid.onnx"]

# (row label, backend kind, device, precision)
CONFIGS: list[tuple[str, str, str, str]] = [
    ("tensorrt fp32", "tensorrt", "cuda", "fp32"),
    ("tensorrt fp16", "tensorrt", "cuda", "fp16"),
    ("tensorrt int8", "tensorrt", "cuda", "int8"),
    ("ort-cuda fp32", "onnxruntime", "cuda", "fp32"),
    ("ort-cuda fp16", "onnxruntime", "cuda", "fp16"),
    ("torch-cuda fp32", "torch", "cuda", "fp32"),
    ("torch-cuda fp16", "torch", "cuda", "fp16"),
    ("ort-cpu fp32", "onnxruntime", "cpu", "fp32"),
    ("torch-cpu fp32", "torch", "cpu", "fp32"),
]
# Words in an unavailability reason that mean "not installed or not shipped here" (a skip), not "broken" (a failure).
LACKING = ("not importable", "missing", "has no CUDAExecutionProvider", "is a CPU build", "Q/DQ model",
           "checkpoint", "no CUDA GPU", "no NVIDIA driver")


@dataclass
class Row:
    label: str
    model: str
    device: str = ""
    batch: int = 0
    mean_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def fps(self) -> float:
        return self.batch * 1000.0 / self.mean_ms


def is_failure(reason: str, gpu: bool) -> bool:
    """A row that cannot run is a failure when a GPU is visible and the reason is not something missing here."""
    return gpu and not any(word in reason for word in LACKING)


def missing_file(kind: str, info: ModelInfo, options: BackendOptions) -> str | None:
    """The file a row needs beside the model and lacks (int8 twin, torch checkpoint), or None."""
    model = info.path
    if options.precision == "int8":
        try:
            int8_model_for(model)
        except BackendError as exc:
            return str(exc).split(":")[0] + f" ({model.stem}_int8.onnx not found)"
    if kind == "torch":
        checkpoint = checkpoint_path(info, options)
        if not checkpoint.is_file():
            return f"no training checkpoint {checkpoint.name} beside the model"
    return None


def time_backend(backend: Backend, batch: np.ndarray, iterations: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        backend.infer(batch)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        backend.infer(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return np.array(times)


def gpu_name() -> str:
    try:
        from unet_perception.backends.cuda_memory import load_cuda

        return load_cuda().device_name(0)
    except Exception:  # noqa: BLE001 - only for the header line
        return "no usable CUDA GPU" + (" (one is visible)" if gpu_visible() else "")


def run(models: list[Path], configs: list[tuple[str, str, str, str]], batches: list[int], iterations: int,
        warmup: int, cache_dir: str, gpu_id: int) -> tuple[list[Row], dict[str, str], dict[str, str]]:
    """Time every (model, config, batch); returns rows, not-run reasons and failures, keyed by row label."""
    gpu = gpu_visible()
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for model in models:
        info = read_model_info(model)
        for label, kind, device, precision in configs:
            key = f"{label} ({model.name})"
            options = BackendOptions(max_batch=max(batches), device=device, precision=precision, gpu_id=gpu_id,
                                     engine_cache_dir=cache_dir)
            reason = backend_module(kind).unavailable_reason(options) or missing_file(kind, info, options)
            if reason is not None:
                (failed if is_failure(reason, gpu and options.device == "cuda") else skipped)[key] = reason
                continue
            try:
                with create_backend(kind, info, options) as backend:  # engine build / conversion: not timed
                    for n in batches:
                        batch = np.random.default_rng(n).integers(0, 256, (n, *info.input_hw, 3), dtype=np.uint8)
                        ms = time_backend(backend, batch, iterations, warmup)
                        rows.append(Row(label, model.name, backend.device, n, float(ms.mean()),
                                        float(np.percentile(ms, 99))))
            except Exception as exc:  # report and go on: one broken backend must not hide the others
                failed[key] = f"{type(exc).__name__}: {exc}"
            print(f"# done: {key}", file=sys.stderr, flush=True)
    return rows, skipped, failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, default=DEFAULT_MODELS, help="contract ONNX models")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all), e.g. 'tensorrt fp16'")
    p.add_argument("--cache-dir", default="", help="engine cache (default: a temporary folder)")
    p.add_argument("--gpu-id", type=int, default=0)
    args = p.parse_args(argv)
    unknown = set(args.only or []) - {c[0] for c in CONFIGS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {[c[0] for c in CONFIGS]}")
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]

    print(f"# machine: {platform.node()}, {platform.processor() or platform.machine()}, GPU: {gpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        rows, skipped, failed = run(args.models, configs, args.batches, args.iterations, args.warmup,
                                    args.cache_dir or tmp, args.gpu_id)
    print(f"\n{args.iterations} timed iterations after {args.warmup} warm-up; latency per batch (host in, host out)\n")
    print("| backend | model | device | batch | mean ms | p99 ms | fps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.label} | {r.model} | {r.device} | {r.batch} | {r.mean_ms:.2f} | {r.p99_ms:.2f} | {r.fps:.1f} |")
    for title, entries in (("not run here", skipped), ("FAILED", failed)):
        if entries:
            print(f"\n{title}:")
            for key, reason in entries.items():
                print(f"- {key}: {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
