"""Training and inference throughput of the seed U-Net on the CPU, printed as a Markdown table.

    python benchmarks/training.py                 # the seed model at 96x128, 176x240, 240x320
    python benchmarks/training.py --iterations 5 --batch-size 4 --threads 2

Training: AdamW steps (forward, weighted CE + Dice loss, backward, update) in torch eager mode.
Inference: torch eager (the ONNX contract's wrapper: uint8 NHWC in, labels out) and the exported
model through the node's ONNX Runtime backend. Images/s counts images, whatever the batch size.
Each measurement follows one warm-up iteration; on a busy machine the numbers drop accordingly.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.class_table import load_class_table
from unet_perception.torch_contract import ContractWrapper, to_model_input
from unet_perception.training.export import export_onnx
from unet_perception.training.losses import CEDiceLoss
from unet_perception.networks import count_parameters
from unet_perception.networks.seed_unet import UNet
from unet_perception.training.train import parse_size

SIZES = ("96x128", "176x240", "240x320")


def images_per_s(step: Callable[[], object], images: int, iterations: int) -> float:
    step()  # warm-up: allocator, oneDNN kernel choice, ORT arena
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    return images * iterations / (time.perf_counter() - start)


def measure(hw: tuple[int, int], norm: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    table = load_class_table(args.dataset)
    torch.manual_seed(0)
    model = UNet(table.num_classes, width=args.width, norm=norm)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.batch_size, *hw, 3), dtype=np.uint8)
    labels = torch.from_numpy(rng.integers(0, table.num_classes, (args.batch_size, *hw), dtype=np.int64))
    loss_fn = CEDiceLoss(table.num_classes, ignore_index=table.ignore_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = to_model_input(torch.from_numpy(frames))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()
        optimizer.step()

    model.train()
    train_ips = images_per_s(train_step, args.batch_size, args.iterations)

    wrapper = ContractWrapper(model).eval()
    batch = torch.from_numpy(frames)

    def torch_step() -> None:
        with torch.inference_mode():
            wrapper(batch)

    torch_ips = images_per_s(torch_step, args.batch_size, args.iterations)

    with warnings.catch_warnings():  # the tracer's notes on the size check are expected
        warnings.simplefilter("ignore")
        path = export_onnx(model, workdir / f"unet_{hw[0]}x{hw[1]}_{norm}.onnx", table, hw)
    options = BackendOptions(max_batch=args.batch_size, threads=args.threads or 0)
    with create_backend("onnxruntime", path, options) as backend:
        ort_ips = images_per_s(lambda: backend.infer(frames), args.batch_size, args.iterations)
    return {"params": count_parameters(model), "train": train_ips, "torch": torch_ips, "ort": ort_ips}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_size, nargs="+", default=[parse_size(s) for s in SIZES],
                   help=f"input sizes HxW (default: {' '.join(SIZES)})")
    p.add_argument("--norms", nargs="+", choices=("none", "batch"), default=["none", "batch"])
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per measurement (after 1 warm-up)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--width", type=int, default=32, help="first-block filters (seed: 32)")
    p.add_argument("--dataset", default="camvid", help="class table (sets the class count)")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: theirs)")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.batch_size < 1:
        p.error("--iterations and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.iterations} iterations, width {args.width}, {args.dataset} classes\n")
    print("| input | norm | parameters | train img/s (torch) | inference img/s (torch) | "
          "inference img/s (ONNX Runtime) |")
    print("|---|---|---:|---:|---:|---:|")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for hw in args.sizes:
            for norm in args.norms:
                r = measure(hw, norm, args, Path(tmp))
                print(f"| {hw[0]}x{hw[1]} | {norm} | {r['params']:,} | {r['train']:.2f} | {r['torch']:.2f} | "
                      f"{r['ort']:.2f} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
