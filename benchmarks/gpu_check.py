"""Everything GPU-related this machine can run, in one command (`make gpu-check`), with a table at the end.

    python benchmarks/gpu_check.py [--models models/unet_camvid.onnx ...] [--frames DIR] [--iterations 50]

Checks, each PASS, FAIL or SKIP (SKIP only for what the machine lacks, and it says what):
- cuda: torch sees the GPU; a GPU the kernel shows but torch's CUDA build cannot use is a FAIL with the reason;
- torch parity and speed, per shipped model with its training checkpoint beside it (else a random-weight seed
  U-Net, said so): torch on CUDA against ONNX Runtime on the CPU, >= 99.9% of label pixels in fp32 (>= 99% with
  fp16 autocast), and 640x480 camera frames per second through the pipeline (resize, infer, upscale), batch 1 and 4;
- cuda-python: the CudaApi memory helper against the real CUDA runtime (device name and capability as torch
  sees them, pinned/device round trip, freed memory comes back, a failed allocation names its CUDA error);
- amp-train: a few training steps with autocast and GradScaler on CUDA (the training code's train_one_epoch);
- where TensorRT imports: `pytest -m tensorrt` and the TensorRT rows of benchmarks/gpu.py (fp32, fp16, int8;
  batch 1 and 4).
Exit status 1 when any check fails. Meant to finish in under 6 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from unet_perception.backends.base import Backend

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FRAMES = REPO.parent / "shared" / "data" / "camvid" / "val"
CAMERA_HW = (480, 640)
PARITY = {"fp32": 0.999, "fp16": 0.99}
BUDGET_S = 360.0


class Skip(Exception):  # noqa: N818 - control flow: the machine lacks what the check needs
    """Raised by a check when the machine lacks what it needs; the message says what."""


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


def run_check(name: str, check: Callable[[], str]) -> Result:
    start = time.perf_counter()
    try:
        detail, status = check(), "PASS"
    except Skip as exc:
        detail, status = str(exc), "SKIP"
    except ModuleNotFoundError as exc:  # a library this machine lacks (onnxruntime, onnx...) is a skip; ours, a bug
        own = (exc.name or "").startswith("unet_perception")
        detail = f"{type(exc).__name__}: {exc}" if own else f"python package '{exc.name}' is not installed"
        status = "FAIL" if own else "SKIP"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row, the others still run
        detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
    result = Result(name, status, detail, time.perf_counter() - start)
    print(f"# {result.status} {name} ({result.seconds:.1f} s): {result.detail}", file=sys.stderr, flush=True)
    return result


def require_cuda_torch() -> None:
    """Skip when this machine has no GPU or torch has no CUDA; fail when a visible GPU cannot be used."""
    import torch

    from unet_perception.backends.cuda_memory import gpu_visible

    if torch.cuda.is_available():
        return
    if not gpu_visible():
        raise Skip("no CUDA GPU on this machine")
    if torch.version.cuda is None:
        raise Skip(f"torch {torch.__version__} is a CPU build (install torch's CUDA build)")
    try:
        torch.cuda.init()
    except Exception as exc:  # torch says why: driver too old, no device...
        raise RuntimeError(f"a GPU is visible but torch (CUDA {torch.version.cuda}) cannot use it: {exc}") from exc
    raise RuntimeError(f"a GPU is visible but torch (CUDA {torch.version.cuda}) sees none")


def check_cuda() -> str:
    import torch

    require_cuda_torch()
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB; "
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s)")


def camera_frames(folder: Path, count: int) -> tuple[list[np.ndarray], str]:
    """``count`` RGB frames at 640x480: CamVid val frames when present, else random ones."""
    import cv2

    from unet_perception.image_files import list_image_files, read_rgb

    files = list_image_files(folder) if folder.is_dir() else []
    if files:
        picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, count)]
        resized = [cv2.resize(read_rgb(f), CAMERA_HW[::-1], interpolation=cv2.INTER_LINEAR) for f in picked]
        return resized, f"{count} frames of {folder}"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*CAMERA_HW, 3), dtype=np.uint8) for _ in range(count)], f"{count} random frames"


def random_seed_model(folder: Path, width: int = 32) -> Path:
    """A seed-size U-Net with random weights, exported with its checkpoint beside it (speed needs no training)."""
    import json

    import torch

    from unet_perception.class_table import load_class_table
    from unet_perception.networks.seed_unet import UNet
    from unet_perception.training.export import export_onnx

    torch.manual_seed(0)
    table = load_class_table("camvid")
    model = UNet(table.num_classes, width=width, norm="batch").eval()
    path = folder / "random_seed_unet.onnx"
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 0,
                "args": {"dataset": "camvid"}, "dataset": table.name, "class_table": json.loads(table.to_json()),
                "ignore_index": table.ignore_index, "layout": table.layout, "input_size": [240, 320],
                "history": []}, path.with_suffix(".pt"))
    return export_onnx(model, path, table, (240, 320))


def labels_in_batches(backend: Backend, batch: np.ndarray) -> np.ndarray:
    """The labels for ``batch``, inferred ``backend.max_batch`` frames at a time."""
    step = backend.max_batch
    return np.concatenate([backend.infer(batch[i:i + step]).labels for i in range(0, len(batch), step)])


def torch_parity_and_speed(model: Path, frames: list[np.ndarray], what: str, iterations: int,
                           trained: bool = True, device: str = "cuda") -> str:
    """torch CUDA (fp32, fp16 autocast) against ONNX Runtime CPU labels, and camera fps through the pipeline.

    A random-weight model (``trained`` False) has near ties between classes that fp16 flips; only its fp32
    agreement is held to the threshold."""
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter, preprocess

    if device == "cuda":
        require_cuda_torch()
    notes = []
    with create_backend("onnxruntime", model, BackendOptions(max_batch=4)) as ort_cpu:
        batch = preprocess(frames, ort_cpu.input_hw)
        want = labels_in_batches(ort_cpu, batch)
    failures = []
    for precision, minimum in PARITY.items():
        with create_backend("torch", model, BackendOptions(max_batch=4, device=device,
                                                           precision=precision)) as backend:
            got = labels_in_batches(backend, batch)
            agreement = float((got == want).mean())
            segmenter = Segmenter(backend, backend.info.classes)
            speeds = []
            for n in (1, 4):
                chunk = frames[:n]
                segmenter.run(chunk)  # warm-up (cuDNN autotuning)
                start = time.perf_counter()
                for _ in range(iterations):
                    segmenter.run(chunk)
                ms = (time.perf_counter() - start) * 1000.0 / iterations
                speeds.append(f"batch {n}: {ms / n:.2f} ms/frame, {n * 1000.0 / ms:.0f} fps")
        notes.append(f"{precision}: {agreement:.4%} of labels as ORT CPU; 640x480 {'; '.join(speeds)}")
        if agreement < minimum and (trained or precision == "fp32"):
            failures.append(f"{precision} agreement {agreement:.4%} < {minimum:.1%}")
    detail = f"{model.name} on {what}: " + " | ".join(notes)
    if failures:
        raise AssertionError(detail + " -- " + "; ".join(failures))
    return detail


def check_cuda_python() -> str:
    """The CudaApi helper against the real CUDA runtime, compared with what torch sees."""
    import torch

    from unet_perception.backends.base import BackendError
    from unet_perception.backends.cuda_memory import CudaError, load_cuda

    require_cuda_torch()
    try:
        cuda = load_cuda()
    except BackendError as exc:
        raise Skip(str(exc)) from exc
    count = cuda.device_count()
    assert count == torch.cuda.device_count(), f"{cuda.library} sees {count} GPUs, torch {torch.cuda.device_count()}"
    name, cc = cuda.device_name(0), cuda.compute_capability(0)
    assert name == torch.cuda.get_device_name(0), f"device name {name!r} != torch's {torch.cuda.get_device_name(0)!r}"
    assert cc == torch.cuda.get_device_capability(0), f"capability {cc} != torch's"
    nbytes = 64 << 20
    torch.cuda.synchronize()
    with cuda.use_device(0):
        free_before = torch.cuda.mem_get_info(0)[0]
        stream = cuda.create_stream()
        src = cuda.alloc_pinned((nbytes,), np.dtype(np.uint8))
        dst = cuda.alloc_pinned((nbytes,), np.dtype(np.uint8))
        device = cuda.alloc_device(nbytes, "check buffer")
        try:
            src[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
            cuda.copy_to_device(device, src, nbytes, stream, "check buffer")
            cuda.copy_to_host(dst, device, nbytes, stream, "check buffer")
            cuda.synchronize(stream)
            assert np.array_equal(src, dst), "the host -> device -> host round trip changed the data"
        finally:
            cuda.free_device(device)
            cuda.free_pinned(src)
            cuda.free_pinned(dst)
            cuda.destroy_stream(stream)
        free_after = torch.cuda.mem_get_info(0)[0]
        assert free_after >= free_before - (8 << 20), f"{(free_before - free_after) >> 20} MiB not freed"
        try:
            cuda.alloc_device(1 << 50, "a 1 PiB buffer")
        except CudaError as exc:
            assert "cudaErrorMemoryAllocation" in str(exc), str(exc)
        else:
            raise AssertionError("a 1 PiB cudaMalloc did not fail")
    return f"{cuda.library} on {name} ({cc[0]}.{cc[1]}): 64 MiB round trip, memory freed, OOM named"


def check_amp_training(steps: int = 4) -> str:
    """A few training steps under autocast + GradScaler on CUDA, through the training code."""
    import torch

    from unet_perception.class_table import load_class_table
    from unet_perception.networks.seed_unet import UNet
    from unet_perception.training.engine import train_one_epoch
    from unet_perception.training.losses import CEDiceLoss

    require_cuda_torch()
    torch.manual_seed(0)
    table = load_class_table("camvid")
    device = torch.device("cuda:0")
    model = UNet(table.num_classes, width=16, norm="batch").to(device)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randint(0, 256, (4, 128, 192, 3), dtype=torch.uint8, generator=gen),
               torch.randint(0, table.num_classes, (4, 128, 192), generator=gen)) for _ in range(steps)]
    loss_fn = CEDiceLoss(table.num_classes, ignore_index=table.ignore_index).to(device)
    stats = train_one_epoch(model, loader, loss_fn, optimizer, None, device, scaler)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert np.isfinite(stats["loss"]) and changed > 0, f"loss {stats['loss']}, {changed} tensors changed"
    return (f"{steps} steps, loss {stats['loss']:.3f}, {stats['images_per_s']:.0f} images/s, "
            f"loss scale {scaler.get_scale():g}")


def tensorrt_present() -> None:
    try:
        import tensorrt
    except ImportError as exc:
        raise Skip("TensorRT is not installed (pip install -r requirements/gpu.txt)") from exc
    if not hasattr(tensorrt, "Builder"):
        raise Skip("TensorRT is not installed (only tensorrt-stubs)")


def run_command(cmd: list[str], timeout_s: float) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    print(proc.stdout, file=sys.stderr)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: " + " / ".join(tail[-6:]))
    return tail[-1] if tail else "ok"


def check_tensorrt_tests() -> str:
    tensorrt_present()
    return run_command([sys.executable, "-m", "pytest", "-q", "-m", "tensorrt", "-rs",
                        "test/test_tensorrt_integration.py"], 240)


def check_tensorrt_rows(models: list[Path], iterations: int) -> str:
    tensorrt_present()
    rows = ["tensorrt fp32", "tensorrt fp16", "tensorrt int8"]
    return run_command([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--models", *map(str, models),
                        "--batches", "1", "4", "--iterations", str(iterations), "--only", *rows], 300)


def shipped_models(paths: list[Path]) -> list[Path]:
    return [p for p in paths if not p.stem.endswith("_int8")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", type=Path, default=shipped_models(sorted((REPO / "models").glob("*.onnx"))))
    p.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="camera frames for parity and speed")
    p.add_argument("--iterations", type=int, default=50)
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = [run_check("cuda", check_cuda)]
    with tempfile.TemporaryDirectory() as tmp:
        # the shipped models with their checkpoint beside them; else a random-weight one (only where CUDA works)
        parity_models = [m for m in args.models if m.with_suffix(".pt").is_file()]
        trained = bool(parity_models)
        if not parity_models:
            parity_models = [random_seed_model(Path(tmp))] if results[0].status == "PASS" else args.models[:1]
        frames, what = camera_frames(args.frames, 8)
        for model in parity_models:
            results.append(run_check(f"torch parity+speed {model.name}",
                                     partial(torch_parity_and_speed, model, frames, what, args.iterations,
                                             trained)))
        results.append(run_check("cuda-python memory helper", check_cuda_python))
        results.append(run_check("amp training steps", check_amp_training))
        results.append(run_check("pytest -m tensorrt", check_tensorrt_tests))
        results.append(run_check("tensorrt rows of gpu.py", lambda: check_tensorrt_rows(args.models, 100)))
    total = time.perf_counter() - start
    print("\n| check | result | seconds | detail |\n|---|---|---|---|")
    for r in results:
        print(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail} |")
    failed = [r.name for r in results if r.status == "FAIL"]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed or skipped, {len(failed)} failed; "
          f"{total:.0f} s" + (f" (over the {BUDGET_S:.0f} s budget)" if total > BUDGET_S else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
