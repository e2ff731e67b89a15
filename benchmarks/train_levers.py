"""What each training lever of issue 18 costs per step: the default network (lite), one AdamW step per iteration
(forward, loss, backward, update), today's recipe against each lever that changes the step, as a Markdown table.

    python benchmarks/train_levers.py                          # batch 8, 3 timed steps each, torch's threads
    nice -n 19 python benchmarks/train_levers.py --iterations 5 --threads 2

Levers that only change which pixels are cropped (--rare-crop) or how long (--epochs) cost nothing per step and
are not in the table. Random inputs: the time of a step does not depend on what the image shows. On a busy
machine every row slows; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from unet_perception.networks.lite_unet import LiteUNet
from unet_perception.torch_contract import to_model_input
from unet_perception.training.ema import ModelEMA
from unet_perception.training.losses import CEDiceLoss
from unet_perception.training.options import parse_size

# name, crop, Lovasz weight, OHEM kept fraction, EMA decay
LEVERS: list[tuple[str, str, float, float, float | None]] = [
    ("today (192x256 crops, CE + Dice)", "192x256", 0.0, 1.0, None),
    ("scale-wide (288x384 crops)", "288x384", 0.0, 1.0, None),
    ("lovasz (+ 0.5 x Lovasz-softmax)", "192x256", 0.5, 1.0, None),
    ("ohem (hardest 25% of pixels)", "192x256", 0.0, 0.25, None),
    ("ema (decay 0.999)", "192x256", 0.0, 1.0, 0.999),
]


def step_seconds(crop: str, lovasz: float, ohem_keep: float, decay: float | None, batch: int,
                 iterations: int) -> float:
    """Median seconds of one training step after one warm-up step."""
    torch.manual_seed(0)
    h, w = parse_size(crop)
    model = LiteUNet(11, pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = CEDiceLoss(11, ignore_index=11, lovasz_weight=lovasz, ohem_keep=ohem_keep)
    ema = ModelEMA(model, decay) if decay is not None else None
    images = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8)
    labels = torch.randint(0, 12, (batch, h, w), dtype=torch.uint8)

    def step() -> None:
        model.train()
        loss = loss_fn(model(to_model_input(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)

    return median_time(step, iterations)


def median_time(step: Callable[[], None], iterations: int) -> float:
    step()  # warm-up: allocator, oneDNN kernel choice
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8, help="today's recipe: 8")
    p.add_argument("--iterations", type=int, default=3, help="timed steps per lever (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}, median of {args.iterations} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| recipe | s/step | crops/s | vs today |\n|---|---:|---:|---:|")
    base = None
    for name, crop, lovasz, ohem_keep, decay in LEVERS:
        seconds = step_seconds(crop, lovasz, ohem_keep, decay, args.batch_size, args.iterations)
        base = base or seconds
        print(f"| {name} | {seconds:.2f} | {args.batch_size / seconds:.1f} | {seconds / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
