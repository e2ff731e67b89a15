"""Inference latency and throughput per backend and precision: TensorRT, ONNX Runtime CUDA/TensorRT EP, torch.

    python benchmarks/gpu.py [--sizes 240x320 480x640] [--batches 1 4] [--iterations 200]
                             [--calibration-data ../shared/data/camvid/train] [--cache-dir /tmp/engines]

Exports the seed-size U-Net (random weights: speed does not depend on them) at each input size, with a
training-style checkpoint beside it for the torch backend, then times ``backend.infer`` (host uint8 in,
host labels out: copies included, pre/post-processing not) after a warm-up. Backends that cannot run here
are listed with the reason; the CPU rows (ONNX Runtime, torch) always run, so the script is checked on any
machine. Prints a Markdown table: latency mean and p99 per batch, and frames per second.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unet_perception.backends.factory import MODULES, BackendOptions, create_backend
from unet_perception.class_table import load_class_table
from unet_perception.training.export import export_onnx
from unet_perception.networks.seed_unet import UNet

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIBRATION = REPO.parent / "shared" / "data" / "camvid" / "train"

# (row label, backend kind, BackendOptions fields)
CONFIGS: list[tuple[str, str, dict[str, str]]] = [
    ("tensorrt fp32", "tensorrt", {"precision": "fp32"}),
    ("tensorrt fp16", "tensorrt", {"precision": "fp16"}),
    ("tensorrt int8", "tensorrt", {"precision": "int8"}),
    ("ort-cuda fp32", "onnxruntime", {"device": "cuda"}),
    ("ort-trt-ep fp16", "onnxruntime", {"device": "tensorrt", "precision": "fp16"}),
    ("torch-cuda fp32", "torch", {"device": "cuda", "precision": "fp32"}),
    ("torch-cuda fp16", "torch", {"device": "cuda", "precision": "fp16"}),
    ("ort-cpu fp32", "onnxruntime", {"device": "cpu"}),
    ("torch-cpu fp32", "torch", {"device": "cpu", "precision": "fp32"}),
]


def make_model(folder: Path, input_hw: tuple[int, int], width: int) -> Path:
    """ONNX model at ``input_hw`` plus the checkpoint beside it (``.pt``) that the torch backend loads."""
    torch.manual_seed(0)
    table = load_class_table("camvid")
    model = UNet(table.num_classes, width=width, norm="batch").eval()
    path = folder / f"unet_{input_hw[0]}x{input_hw[1]}.onnx"
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 0,
                "args": {"dataset": "camvid"}, "dataset": table.name, "class_table": json.loads(table.to_json()),
                "ignore_index": table.ignore_index, "layout": table.layout, "input_size": list(input_hw),
                "history": []}, path.with_suffix(".pt"))
    return export_onnx(model, path, table, input_hw)


def time_backend(backend: object, batch: np.ndarray, iterations: int, warmup: int) -> list[float]:
    infer = backend.infer  # type: ignore[attr-defined]
    for _ in range(warmup):
        infer(batch)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        infer(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[(240, 320), (480, 640)], metavar="HxW")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--width", type=int, default=32, help="U-Net base filters (32 = the seed's)")
    p.add_argument("--only", nargs="*", default=None, help="row labels to run (default: all)")
    p.add_argument("--calibration-data", default=str(DEFAULT_CALIBRATION), help="frames for the int8 calibrator")
    p.add_argument("--cache-dir", default="", help="engine cache (default: a temporary folder)")
    p.add_argument("--gpu-id", type=int, default=0)
    args = p.parse_args(argv)

    print(f"# machine: {platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
          + (f", GPU {torch.cuda.get_device_name(args.gpu_id)}" if torch.cuda.is_available() else ", no CUDA GPU"))
    configs = [c for c in CONFIGS if args.only is None or c[0] in args.only]
    max_batch = max(args.batches)
    skipped: dict[str, str] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or str(Path(tmp) / "engines")
        for hw in args.sizes:
            model = make_model(Path(tmp), hw, args.width)
            for label, kind, fields in configs:
                options = BackendOptions(max_batch=max_batch, engine_cache_dir=cache_dir, gpu_id=args.gpu_id,
                                         calibration_data=args.calibration_data, **fields)  # type: ignore[arg-type]
                reason = importlib.import_module(MODULES[kind]).unavailable_reason(options)
                if reason is None and fields.get("precision") == "int8" and not Path(args.calibration_data).is_dir():
                    reason = f"no calibration frames at {args.calibration_data} (--calibration-data)"
                if reason is not None:
                    skipped[label] = reason
                    continue
                try:
                    backend = create_backend(kind, model, options)
                    backend.activate()  # a TensorRT engine build happens here, outside the timing
                except Exception as exc:  # report and go on: one broken backend must not hide the others
                    skipped[label] = f"failed to start: {type(exc).__name__}: {exc}"
                    continue
                with backend:
                    for n in args.batches:
                        batch = np.random.default_rng(n).integers(0, 256, (n, *hw, 3), dtype=np.uint8)
                        ms = np.array(time_backend(backend, batch, args.iterations, args.warmup))
                        rows.append((label, backend.device, f"{hw[0]}x{hw[1]}", n, ms.mean(),
                                     np.percentile(ms, 99), n * 1000.0 / ms.mean()))
                print(f"# done: {label} at {hw[0]}x{hw[1]}", file=sys.stderr, flush=True)

    print(f"\n{args.iterations} timed iterations after {args.warmup} warm-up; latency per batch (host in, host out)\n")
    print("| backend | device | input | batch | mean ms | p99 ms | fps |")
    print("|---|---|---|---|---|---|---|")
    for label, device, size, n, mean, p99, fps in rows:
        print(f"| {label} | {device} | {size} | {n} | {mean:.2f} | {p99:.2f} | {fps:.1f} |")
    if skipped:
        print("\nnot run here:")
        for label, reason in skipped.items():
            print(f"- {label}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
