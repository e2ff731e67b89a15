"""Train the U-Net on a road-scene dataset (CamVid, the lab's CARLA frames, or any class-table layout).

Single process:  unet-train --dataset camvid --data ../shared/data/camvid --out runs/camvid
Several GPUs:    torchrun --nproc-per-node 4 -m unet_perception.training.train --dataset camvid ...
Final fit:       unet-train --recipe today --train-splits train,val ...   (fixed schedule, last.pt)
One fold:        unet-train --recipe today --holdout-sequence 0006R0 ... (train+val minus 0006R0, scored on it)
Writes ``last.pt`` every epoch, ``best.pt`` on the best val mIoU when val is a split apart (the default), and
``final_eval.json`` (the last weights on the eval frames) and ``frames.json`` (which frames trained and which
scored) into ``--out``; ``--resume`` continues from ``last.pt`` (model, optimizer, scheduler, epoch, history).
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

from unet_perception.atomic_file import replacing
from unet_perception.class_table import ClassTable, load_class_table
from unet_perception.training.data import SegmentationDataset, hold_out, pairs_of_splits, train_transform
from unet_perception.training.ema import ModelEMA
from unet_perception.training.engine import (all_reduce_confusion, collate, confusion_on_frames,
                                             predict_labels, train_one_epoch)
from unet_perception.training.losses import CEDiceLoss, enet_class_weights
from unet_perception.training.options import build_parser, expand_recipe
from unet_perception.training.options import parse_size as parse_size  # unet-export and benchmarks import it here
from unet_perception.metrics import mean_iou, summarize
from unet_perception.networks import count_parameters
from unet_perception.networks.seed_unet import UNet


def make_model(args: argparse.Namespace, num_classes: int) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """The network and its optimizer parameter groups (a pretrained encoder learns at a lower rate)."""
    if args.arch == "seed":
        seed = UNet(num_classes, width=args.width, dropout=args.dropout, norm=args.norm)
        return seed, [{"params": list(seed.parameters()), "lr": args.lr}]
    from unet_perception.networks.lite_unet import LiteUNet
    lite = LiteUNet(num_classes, decoder=args.decoder, pretrained=not args.no_pretrained)
    return lite, [{"params": lite.encoder_parameters(), "lr": args.lr * args.encoder_lr},
                  {"params": lite.decoder_parameters(), "lr": args.lr}]


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
                      dice_weight=0.5 if args.loss == "weighted-ce-dice" else 0.0, lovasz_weight=args.lovasz,
                      ohem_keep=args.ohem_keep).to(device)


def train_splits(args: argparse.Namespace) -> list[str]:
    return args.train_splits or (["train", "val"] if args.holdout_sequence else ["train"])


def build_datasets(args: argparse.Namespace, table: ClassTable) -> tuple[SegmentationDataset,
                                                                         SegmentationDataset | None, str, bool]:
    """(train frames, eval frames or None, the eval set's name, whether best.pt is selected on it).

    Only a split apart from training selects; a held-out sequence only scores (selecting on the fold would make
    its score an optimistic one), and a split inside training is no test at all, so it is not scored."""
    splits = train_splits(args)
    pool = pairs_of_splits(Path(args.data), table, splits)
    name = "+".join(splits)
    if args.holdout_sequence:
        rest, held = hold_out(pool, args.holdout_sequence)
        return (SegmentationDataset(args.data, table, name, limit=args.limit, pairs=rest),
                SegmentationDataset(args.data, table, args.holdout_sequence, limit=args.limit, pairs=held),
                f"held-out {args.holdout_sequence}", False)
    train_set = SegmentationDataset(args.data, table, name, limit=args.limit, pairs=pool)
    if args.eval_split == "none" or args.eval_split in splits:
        return train_set, None, "", False
    return (train_set, SegmentationDataset(args.data, table, args.eval_split, limit=args.limit),
            args.eval_split, True)


def write_frames(path: Path, train_set: SegmentationDataset, eval_set: SegmentationDataset | None) -> None:
    """Which frames trained and which scored, by file name: the record a reader checks for leaks."""
    path.write_text(json.dumps({"train": [p.image.name for p in train_set.pairs],
                                "eval": [p.image.name for p in eval_set.pairs] if eval_set else []}, indent=0))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with replacing(path) as f:  # never a half-written checkpoint under the real name
        torch.save(state, f)


def resume(path: Path, steps: int, model: torch.nn.Module, ema: ModelEMA | None, optimizer: torch.optim.Optimizer,
           scheduler: Any, scaler: Any, device: torch.device) -> tuple[int, float, list[dict[str, Any]]]:
    """Load ``path`` into the training state; returns (next epoch, best mIoU, history)."""
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at '{path}'")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if ckpt["scheduler"].get("total_steps") != steps:
        # OneCycleLR cannot be stretched: stepping past its saved length raises deep inside torch.
        raise SystemExit(f"--resume: '{path}' follows a schedule of {ckpt['args']['epochs']} epochs "
                         f"({ckpt['scheduler'].get('total_steps')} steps) but this run has {steps}; resume "
                         "with the same --epochs, --batch-size and --limit, or train into a new --out")
    if (ema is None) != (ckpt.get("ema") is None):
        raise SystemExit(f"--resume: '{path}' was trained {'with' if ckpt.get('ema') else 'without'} --ema; "
                         "resume with the same --ema")
    # With EMA, 'model' holds the average (what is scored and exported) and 'train_model' the live weights.
    model.load_state_dict(ckpt.get("train_model") or ckpt["model"])
    if ema is not None:
        ema.load(ckpt["model"], ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    np.random.set_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    return ckpt["epoch"] + 1, ckpt["best_miou"], ckpt["history"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(expand_recipe(sys.argv[1:] if argv is None else argv))
    rank, world, device = setup_distributed(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed + rank)
    try:
        table = load_class_table(args.dataset)
        train_set, eval_set, eval_name, selects = build_datasets(args, table)
    except (ValueError, OSError) as exc:  # an unknown dataset, a --data root that is not there
        raise SystemExit(f"unet-train: {exc}") from None
    out = Path(args.out)
    if args.resume and not (out / "last.pt").is_file():  # before anything is written: no empty --out left behind
        raise SystemExit(f"--resume: no checkpoint at '{out / 'last.pt'}'")
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "train.log"

    crop = args.crop_size or args.input_size
    eval_size = args.eval_size or args.input_size
    frame_h = train_set.images[0].shape[0]
    scale = tuple(args.scale) if args.scale else (args.input_size[0] / frame_h * 0.8,
                                                  args.input_size[0] / frame_h * 1.25)
    train_set.transform = train_transform(crop, scale, table.ignore_index, seed=args.seed + rank,
                                          rare_crop=args.rare_crop)

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
    ema = ModelEMA(model, args.ema) if args.ema is not None else None
    scored = ema.module if ema is not None else model  # what is evaluated, checkpointed as 'model', exported
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

    start_epoch, best, history = 0, -1.0, list[dict[str, Any]]()
    if args.resume:
        start_epoch, best, history = resume(out / "last.pt", steps, model, ema, optimizer, scheduler, scaler, device)
        log(rank, f"resumed from {out / 'last.pt'} at epoch {start_epoch}", logfile)
    if rank == 0:
        write_frames(out / "frames.json", train_set, eval_set)

    log(rank, f"unet-train: {table.name}, {len(train_set)} train frames ({'+'.join(train_splits(args))}), "
              f"{len(eval_set) if eval_set else 0} eval frames ({eval_name or 'none'}"
              f"{', selects best.pt' if selects else ''}), "
              f"{table.num_classes} classes, model {args.arch} {count_parameters(model):,} parameters, "
              f"input {args.input_size}, scored at {eval_size}, crop {crop}, scale {scale[0]:.2f}-{scale[1]:.2f}, "
              f"device {device}, world {world}", logfile)
    t_start = time.perf_counter()
    cm = None
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        bar = None
        if rank == 0 and not args.no_progress:
            from tqdm import tqdm
            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
                       file=sys.stderr)
        stats = train_one_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, device, scaler,
                                None if bar is None else _progress_callback(bar, world),
                                None if ema is None else lambda: ema.update(model))
        if bar is not None:
            bar.close()
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": stats["loss"],
                                  "train_images_per_s": stats["images_per_s"] * world,
                                  "lr": scheduler.get_last_lr()[0]}
        if eval_set is not None and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            mine = list(range(rank, len(eval_set), world))  # each rank scores its share
            cm = all_reduce_confusion(confusion_on_frames(
                lambda frames: predict_labels(scored, frames, eval_size, device),
                [eval_set.images[i] for i in mine], [eval_set.labels[i] for i in mine],
                table.num_classes, table.ignore_index))
            record["val_miou"] = mean_iou(cm)  # 'val' names the eval set, whichever it is (export reads it)
            record["val"] = summarize(cm, table.names)
        history.append(record)
        miou = record.get("val_miou")
        log(rank, f"epoch {epoch + 1}/{args.epochs} loss {stats['loss']:.4f} "
                  f"{record['train_images_per_s']:.2f} img/s"
                  + (f" {eval_name} mIoU {miou:.4f}" if miou is not None else "")
                  + f" elapsed {(time.perf_counter() - t_start) / 60:.1f} min", logfile)
        if rank == 0:
            state = {
                "model": scored.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "epoch": epoch, "args": vars(args), "model_config": model.config,
                "dataset": table.name, "class_table": json.loads(table.to_json()),
                "ignore_index": table.ignore_index, "layout": table.layout, "input_size": list(args.input_size),
                "best_miou": max(best, miou if miou is not None and selects else -1.0), "history": history,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                        "python": random.getstate()},
                "ema": None if ema is None else ema.state_dict(), "eval_set": eval_name,
            }
            if ema is not None:
                state["train_model"] = model.state_dict()
            if selects and miou is not None and miou > best:
                best = miou
                save_checkpoint(out / "best.pt", state)
            save_checkpoint(out / "last.pt", state)
            (out / "history.json").write_text(json.dumps(history, indent=1))
    minutes = (time.perf_counter() - t_start) / 60
    if rank == 0 and eval_set is not None and cm is not None:
        report = {"eval_set": eval_name, "frames": len(eval_set), "epochs": args.epochs, "eval_size": list(eval_size),
                  "train_frames": len(train_set), "minutes": round(minutes, 2), **summarize(cm, table.names),
                  "confusion_matrix": cm.tolist()}
        (out / "final_eval.json").write_text(json.dumps(report, indent=1))
    final = history[-1].get("val_miou") if history else None
    log(rank, f"done: {'best val mIoU ' + f'{best:.4f}, ' if selects else ''}"
              + (f"final {eval_name} mIoU {final:.4f}, " if final is not None else "")
              + f"{minutes:.1f} min for epochs {start_epoch + 1}..{args.epochs}", logfile)
    if world > 1:
        # Every rank reaches this point before any tears the group down: a rank leaving while another
        # still talks to it aborts the other's gloo threads ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
