"""Train the U-Net on a road-scene dataset (CamVid, the lab's CARLA frames, or any class-table layout).

Single process:  unet-train --dataset camvid --data ../shared/data/camvid --out runs/camvid
Several GPUs:    torchrun --nproc-per-node 4 -m unet_perception.training.train --dataset camvid ...
Writes ``last.pt`` every epoch and ``best.pt`` on the best validation mIoU into ``--out``;
``--resume`` continues from ``last.pt`` (model, optimizer, scheduler, epoch, history).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from unet_perception.class_table import ClassTable, available_tables, load_class_table
from unet_perception.training.data import SegmentationDataset, train_transform
from unet_perception.training.engine import (all_reduce_confusion, collate, confusion_on_frames,
                                             predict_labels, train_one_epoch)
from unet_perception.training.losses import CEDiceLoss, enet_class_weights
from unet_perception.metrics import mean_iou, summarize
from unet_perception.networks import ARCHS, count_parameters
from unet_perception.networks.seed_unet import DEPTH, UNet


def parse_size(text: str) -> tuple[int, int]:
    """'240x320' -> (240, 320) (height x width), each a multiple of 16."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH (e.g. 240x320), got '{text}'") from None
    m = 2**DEPTH
    if h <= 0 or w <= 0 or h % m or w % m:
        hint = f"{max(m, round(h / m) * m)}x{max(m, round(w / m) * m)}"
        raise argparse.ArgumentTypeError(f"size {h}x{w} is not a positive multiple of {m}; use {hint}")
    return h, w


def parse_widths(text: str) -> tuple[int, ...]:
    """'128,64,48,32' -> (128, 64, 48, 32)."""
    try:
        widths = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must look like 128,64,48,32, got '{text}'") from None
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"give 4 positive widths (strides 16, 8, 4, 2), got '{text}'")
    return widths


def make_model(args: argparse.Namespace, num_classes: int) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The network and its optimizer parameter groups (a pretrained encoder learns at a lower rate)."""
    if args.arch == "seed":
        seed = UNet(num_classes, width=args.width, dropout=args.dropout, norm=args.norm)
        return seed, [{"params": list(seed.parameters()), "lr": args.lr}]
    from unet_perception.networks.lite_unet import LiteUNet
    lite = LiteUNet(num_classes, decoder=args.decoder, pretrained=not args.no_pretrained)
    return lite, [{"params": lite.encoder_parameters(), "lr": args.lr * args.encoder_lr},
                  {"params": lite.decoder_parameters(), "lr": args.lr}]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid",
                   help=f"class table / layout: one of {available_tables()} or a table JSON path")
    p.add_argument("--data", required=True, help="dataset root folder (e.g. ../shared/data/camvid)")
    p.add_argument("--out", default="runs/unet", help="output folder for checkpoints and the log")
    p.add_argument("--input-size", type=parse_size, default=(96, 128),
                   help="model input HxW used for validation and export (seed: 96x128)")
    p.add_argument("--crop-size", type=parse_size, default=None,
                   help="training crop HxW (default: the input size)")
    p.add_argument("--scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="random rescale range of the full frame before cropping "
                        "(default: around input size / frame size)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="per process (seed: 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, one-cycle)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--arch", choices=ARCHS, default="lite",
                   help="lite: U-Net decoder on an ImageNet-pretrained EfficientNet-Lite0 (default); "
                        "seed: the lab's U-Net")
    p.add_argument("--decoder", type=parse_widths, default=(128, 64, 48, 32),
                   help="lite: decoder widths at strides 16, 8, 4, 2 (default 128,64,48,32)")
    p.add_argument("--encoder-lr", type=float, default=0.25,
                   help="lite: the encoder's learning rate as a fraction of --lr (default 0.25)")
    p.add_argument("--no-pretrained", action="store_true",
                   help="lite: start the encoder from random weights instead of ImageNet")
    p.add_argument("--width", type=int, default=32, help="seed: filters of the first block (32)")
    p.add_argument("--norm", choices=("none", "batch"), default="none", help="seed: batch norm after convs")
    p.add_argument("--dropout", type=float, default=0.3, help="seed: dropout in the two deepest blocks")
    p.add_argument("--loss", choices=("ce", "weighted-ce", "weighted-ce-dice"), default="weighted-ce-dice",
                   help="ce is the seed's loss; the weighted ones handle class imbalance")
    p.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and on the last)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N frames of each split")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group when launched by torchrun; returns rank, world size, device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        device = torch.device("cuda", local if world > 1 else torch.device(device_arg).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def log(rank: int, msg: str, logfile: Path | None = None) -> None:
    if rank != 0:
        return
    print(msg, flush=True)
    if logfile is not None:
        with logfile.open("a") as f:
            f.write(msg + "\n")


def _progress_callback(bar: Any, world: int) -> Callable[[float, float], None]:
    """Per-step progress: loss and images/s (over all ranks) on the tqdm bar."""
    def progress(loss: float, ips: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips * world:.2f}")
        bar.update(1)
    return progress


def make_loss(args: argparse.Namespace, table: ClassTable, train_set: SegmentationDataset,
              device: torch.device) -> CEDiceLoss:
    weight = None
    if args.loss != "ce":
        weight = enet_class_weights(train_set.class_pixel_fractions())
    return CEDiceLoss(table.num_classes, weight, table.ignore_index,
                      dice_weight=0.5 if args.loss == "weighted-ce-dice" else 0.0).to(device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + rank)
    table = load_class_table(args.dataset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "train.log"

    crop = args.crop_size or args.input_size
    train_set = SegmentationDataset(args.data, table, "train", limit=args.limit)
    val_set = SegmentationDataset(args.data, table, "val", limit=args.limit)
    frame_h = train_set.images[0].shape[0]
    scale = tuple(args.scale) if args.scale else (args.input_size[0] / frame_h * 0.8,
                                                  args.input_size[0] / frame_h * 1.25)
    train_set.transform = train_transform(crop, scale, table.ignore_index, seed=args.seed + rank)

    sampler: DistributedSampler[Any] | None = None
    if world > 1:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    loader: DataLoader[Any] = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, num_workers=args.workers,
        collate_fn=collate, drop_last=len(train_set) > args.batch_size, generator=gen,
        persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")

    model, groups = make_model(args, table.num_classes)
    model = model.to(device)
    if world > 1:
        ddp_model: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp_model = model
    loss_fn = make_loss(args, table, train_set, device)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    steps = max(1, len(loader)) * args.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                    total_steps=steps, pct_start=0.1)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and not args.no_amp else None

    start_epoch, best, history = 0, -1.0, []
    if args.resume:
        ckpt_path = out / "last.pt"
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at '{ckpt_path}'")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["scheduler"].get("total_steps") != steps:
            # OneCycleLR cannot be stretched: stepping past its saved length raises deep inside torch.
            raise SystemExit(f"--resume: '{ckpt_path}' follows a schedule of {ckpt['args']['epochs']} epochs "
                             f"({ckpt['scheduler'].get('total_steps')} steps) but this run has {steps}; resume "
                             "with the same --epochs, --batch-size and --limit, or train into a new --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best_miou"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        log(rank, f"resumed from {ckpt_path} at epoch {start_epoch}", logfile)

    log(rank, f"unet-train: {table.name}, {len(train_set)} train / {len(val_set)} val frames, "
              f"{table.num_classes} classes, model {args.arch} {count_parameters(model):,} parameters, "
              f"input {args.input_size}, crop {crop}, scale {scale[0]:.2f}-{scale[1]:.2f}, "
              f"device {device}, world {world}", logfile)
    t_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        bar = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       file=sys.stderr)
        stats = train_one_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, device, scaler,
                                None if bar is None else _progress_callback(bar, world))
        if bar is not None:
            bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": stats["loss"],
                                  "train_images_per_s": stats["images_per_s"] * world,
                                  "lr": scheduler.get_last_lr()[0]}
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            mine = list(range(rank, len(val_set), world))  # each rank scores its share of val
            cm = confusion_on_frames(
                lambda frames: predict_labels(model, frames, args.input_size, device),
                [val_set.images[i] for i in mine], [val_set.labels[i] for i in mine],
                table.num_classes, table.ignore_index)
            cm = all_reduce_confusion(cm)
            record["val_miou"] = mean_iou(cm)
            record["val"] = summarize(cm, table.names)
        history.append(record)
        miou = record.get("val_miou")
        log(rank, f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} "
                  f"{record['train_images_per_s']:.2f} img/s"
                  + (f" val mIoU {miou:.4f}" if miou is not None else "")
                  + f" elapsed {(time.perf_counter() - t_start) / 60:.1f} min", logfile)
        if rank == 0:
            state = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch, "args": vars(args), "model_config": model.config,
                "dataset": table.name, "class_table": json.loads(table.to_json()),
                "ignore_index": table.ignore_index, "layout": table.layout, "input_size": list(args.input_size),
                "best_miou": max(best, miou if miou is not None else -1.0), "history": history,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()},
            }
            if miou is not None and miou > best:
                best = miou
                state["best_miou"] = best
                save_checkpoint(out / "best.pt", state)
            save_checkpoint(out / "last.pt", state)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    log(rank, f"done: best val mIoU {best:.4f}, {(time.perf_counter() - t_start) / 60:.1f} min "
              f"for epochs {start_epoch + 1}..{args.epochs}", logfile)
    if world > 1:
        # Every rank reaches this point before any tears the group down: a rank leaving while another
        # still talks to it aborts the other's gloo threads ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
