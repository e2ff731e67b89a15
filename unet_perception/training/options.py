"""unet-train's command line: the options, their checks, and named recipes (``--recipe``).

A recipe is a list of unet-train options; options given after it on the command line win, so
``--recipe today --epochs 200`` is today's recipe with a longer schedule. ``unet-folds`` and ``make model`` name
recipes, so the fold table and the shipped model are trained by the same options.
"""

from __future__ import annotations

import argparse

from unet_perception.class_table import available_tables
from unet_perception.networks import ARCHS
from unet_perception.networks.seed_unet import DEPTH

# The recipe behind the shipped unet_camvid.onnx (models/README.md), without the machine's own options.
TODAY = ["--arch", "lite", "--input-size", "288x384", "--crop-size", "192x256", "--scale", "0.6", "1.0",
         "--epochs", "110", "--batch-size", "8", "--lr", "2e-3", "--encoder-lr", "0.25",
         "--loss", "weighted-ce-dice", "--seed", "0"]

# One lever each on top of today's recipe: the rows of the fold table in the model card.
RECIPES: dict[str, tuple[str, list[str]]] = {
    "today": ("the shipped model's recipe: 288x384, crops 192x256, scale 0.6-1.0, 110 epochs", TODAY),
    "export-size": ("trained at the export size 256x352 (scale range moved with it)",
                    [*TODAY, "--input-size", "256x352", "--scale", "0.53", "0.89"]),
    "scale-wide": ("scale 0.5-1.5 with 288x384 crops (2.25x the pixels per step)",
                   [*TODAY, "--scale", "0.5", "1.5", "--crop-size", "288x384"]),
    "rare-crops": ("half the crops class-uniform (centred on a class drawn uniformly from the frame's)",
                   [*TODAY, "--rare-crop", "0.5"]),
    "lovasz": ("+ 0.5 x Lovasz-softmax", [*TODAY, "--lovasz", "0.5"]),
    "ohem": ("cross-entropy on the hardest 25% of pixels", [*TODAY, "--ohem-keep", "0.25"]),
    "ema": ("EMA of the weights, decay 0.999 (the EMA is evaluated and exported)", [*TODAY, "--ema", "0.999"]),
    "long": ("200 epochs instead of 110", [*TODAY, "--epochs", "200"]),
}


def recipes_help() -> str:
    """The recipes for --help (argparse formats help with %, so a literal % is doubled)."""
    return "; ".join(f"{name}: {what}" for name, (what, _) in RECIPES.items()).replace("%", "%%")


def expand_recipe(argv: list[str]) -> list[str]:
    """``argv`` with the options of its ``--recipe`` put in front (later options override them)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", choices=sorted(RECIPES))
    known, _ = pre.parse_known_args(argv)
    return [*RECIPES[known.recipe][1], *argv] if known.recipe else argv


def parse_splits(text: str) -> list[str]:
    """'train,val' -> ['train', 'val']."""
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if not splits or len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"give split names separated by commas, each once (train,val), got '{text}'")
    return splits


def fraction(text: str) -> float:
    """A probability in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"give a fraction in [0, 1], got {text}")
    return value


def kept_fraction(text: str) -> float:
    """A fraction of pixels to keep, in (0, 1]."""
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"give a fraction in (0, 1], got {text}")
    return value


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


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """unet-train's parser; ``description`` is the --help text above the options (train.py's docstring)."""
    p = argparse.ArgumentParser(prog="unet-train", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="camvid",
                   help=f"class table / layout: one of {available_tables()} or a table JSON path")
    p.add_argument("--data", required=True, help="dataset root folder (e.g. ../shared/data/camvid)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from a named recipe; options after it override it: "
                        + recipes_help())
    p.add_argument("--train-splits", type=parse_splits, default=None, metavar="SPLITS",
                   help="splits to train on, e.g. train,val for the final fit (default: train, or train,val "
                        "with --holdout-sequence); when they include --eval-split nothing is left to select on: "
                        "the run follows its fixed schedule and last.pt is the result")
    p.add_argument("--holdout-sequence", default=None, metavar="NAME",
                   help="cross-validation fold: train on --train-splits minus every frame of this video sequence "
                        "(CamVid: 0001TP, 0006R0, 0016E5, from the file names) and evaluate on those frames; "
                        "no checkpoint is selected on them (last.pt, final_eval.json)")
    p.add_argument("--eval-split", default="val",
                   help="split scored during training and used to select best.pt (default val; none: no scoring)")
    p.add_argument("--eval-size", type=parse_size, default=None, metavar="HxW",
                   help="input size for scoring (default: --input-size); give the export size to score what "
                        "ships")
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
    p.add_argument("--rare-crop", type=fraction, default=0.0, metavar="P",
                   help="probability that a training crop is class-uniform: centred on a pixel of a class drawn "
                        "uniformly from the frame's classes, so thin classes fill more crops (default 0)")
    p.add_argument("--lovasz", type=float, default=0.0, metavar="W",
                   help="add W x Lovasz-softmax (an IoU surrogate) to the loss (default 0)")
    p.add_argument("--ohem-keep", type=kept_fraction, default=1.0, metavar="F",
                   help="cross-entropy over the hardest fraction F of labelled pixels only (default 1: all)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999); the average is what "
                        "is scored, checkpointed as 'model' and exported")
    p.add_argument("--val-every", type=int, default=1, help="score the eval set every N epochs (and on the last)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N frames of each split")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    return p


