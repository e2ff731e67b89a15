"""Cross-validation by video sequence: the estimate of accuracy on roads a model has never seen.

    unet-folds --recipe today --data ../shared/data/camvid --out runs/folds --eval-size 256x352
    unet-folds --recipe today --data ../shared/data/camvid --onnx 256x352 --onnx 288x384   # + fp32/int8 ONNX
    unet-folds --compare runs/folds          # every recipe's fold mean side by side
    make folds RECIPE=lovasz                 # the same through the Makefile

Each fold is one ``unet-train --recipe R --holdout-sequence S`` run: train+val minus every frame of sequence S,
a fixed schedule (no checkpoint is selected on S), and the last weights scored on S at ``--eval-size`` (give the
export size, so the score is that of the file that ships). Options the driver does not know go to unet-train
(``--workers 1 --epochs 20``). Writes ``OUT/RECIPE/S/`` (the fold's run), ``OUT/RECIPE/folds.json`` and
``OUT/RECIPE/folds.md`` (per-class IoU of each fold and their mean); ``--onnx HxW`` also exports each fold at
HxW, quantizes it (calibrated on the fold's training frames) and writes ``folds_onnx_HxW.md`` for fp32 and
int8. A fold whose ``final_eval.json`` is there from the same options is not trained again; one with only
``last.pt`` resumes. Compare recipes by the mean row,
never by val alone: val (0016E5) shares its street with 204 of the 367 train frames.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from unet_perception.training import train
from unet_perception.training.options import RECIPES, parse_size, recipes_help

FOLDS = ("0006R0", "0001TP")  # CamVid train+val's sequences apart from 0016E5, the street val was taken on


def run_fold(recipe: str, sequence: str, data: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """Train and score one fold (or reuse a finished one trained with the same options); its final_eval.json."""
    # Scoring the held-out frames is a forward pass over all of them: every 10 epochs gives the curve (extra wins).
    argv = ["--recipe", recipe, "--dataset", "camvid", "--data", data, "--holdout-sequence", sequence,
            "--val-every", "10", "--out", str(out), *extra]
    report_path, options_path = out / "final_eval.json", out / "fold_options.json"
    if report_path.is_file() and options_path.is_file() and json.loads(options_path.read_text()) == argv:
        print(f"unet-folds: {recipe} / {sequence}: done before, reusing {report_path}", flush=True)
        return dict(json.loads(report_path.read_text()))
    resume = ["--resume"] if (out / "last.pt").is_file() and options_path.is_file() and \
        json.loads(options_path.read_text()) == argv else []
    out.mkdir(parents=True, exist_ok=True)
    options_path.write_text(json.dumps(argv))
    report_path.unlink(missing_ok=True)
    if train.main([*argv, *resume]) != 0:
        raise SystemExit(f"unet-folds: the {sequence} fold of '{recipe}' failed; see {out / 'train.log'}")
    return dict(json.loads(report_path.read_text()))


def fold_table(recipe: str, reports: dict[str, dict[str, Any]], extra: list[str]) -> dict[str, Any]:
    """Per-class IoU of each fold and the mean over folds (of the folds where the class is in the truth);
    ``extra`` are the unet-train options given on top of the recipe (a table says what really ran)."""
    names = list(next(iter(reports.values()))["per_class_iou"])
    mean_class: dict[str, float | None] = {}
    for name in names:
        values = [r["per_class_iou"][name] for r in reports.values()
                  if r["per_class_iou"][name] is not None and r["truth_pixels"][name] > 0]
        mean_class[name] = sum(values) / len(values) if values else None
    fold_mious = [r["mean_iou"] for r in reports.values()]
    return {"recipe": recipe, "description": RECIPES[recipe][0] if recipe in RECIPES else "", "options": extra,
            "folds": {seq: {"mean_iou": r["mean_iou"], "per_class_iou": r["per_class_iou"], "frames": r["frames"],
                            "train_frames": r["train_frames"], "epochs": r["epochs"], "eval_size": r["eval_size"],
                            "minutes": r["minutes"]} for seq, r in reports.items()},
            "mean_iou": sum(fold_mious) / len(fold_mious), "per_class_iou": mean_class}


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(table: dict[str, Any]) -> str:
    """The fold table for the model card: one column per fold, then the mean."""
    folds = table["folds"]
    head = " | ".join(f"held-out {s} ({f['frames']} frames)" for s, f in folds.items())
    options = f" with `{' '.join(table['options'])}` on top" if table["options"] else ""
    lines = [f"Recipe `{table['recipe']}` ({table['description']}){options}", "",
             f"| class | {head} | **mean** |", "|---|" + "---:|" * (len(folds) + 1)]
    for name, mean in table["per_class_iou"].items():
        row = " | ".join(_cell(f["per_class_iou"][name]) for f in folds.values())
        lines.append(f"| {name} | {row} | **{_cell(mean)}** |")
    row = " | ".join(_cell(f["mean_iou"]) for f in folds.values())
    lines.append(f"| **mIoU** | {row} | **{table['mean_iou']:.3f}** |")
    minutes = " | ".join(f"{f['minutes']:.1f} min, {f['epochs']} epochs on {f['train_frames']} frames"
                         for f in folds.values())
    lines.append(f"| time | {minutes} | |")
    return "\n".join(lines) + "\n"


def compare(root: Path) -> str:
    """Every recipe's fold mean under ``root`` against today's, as a Markdown table."""
    tables = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/folds.json"))}
    if not tables:
        raise SystemExit(f"unet-folds: no */folds.json under '{root}'; run the folds first")
    base = tables.get("today")
    names = list(next(iter(tables.values()))["per_class_iou"])
    lines = ["| recipe | folds | mean mIoU | vs today | " + " | ".join(names) + " |",
             "|---|---|---:|---:|" + "---:|" * len(names)]
    for recipe, t in tables.items():
        delta = "" if base is None else f"{(t['mean_iou'] - base['mean_iou']) * 100:+.1f}"
        cells = " | ".join(_cell(t["per_class_iou"][n]) for n in names)
        lines.append(f"| {recipe} | {', '.join(t['folds'])} | {t['mean_iou']:.3f} | {delta} | {cells} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: an abbreviated unet-train option must reach unet-train, not match one of ours
    p = argparse.ArgumentParser(prog="unet-folds", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="today",
                   help=recipes_help())
    p.add_argument("--data", default=None, help="CamVid root (../shared/data/camvid)")
    p.add_argument("--out", default="runs/folds", help="folder of every recipe's folds (default runs/folds)")
    p.add_argument("--folds", default=",".join(FOLDS), help=f"sequences to hold out (default {','.join(FOLDS)})")
    p.add_argument("--onnx", type=parse_size, action="append", default=[], metavar="HxW",
                   help="also export each fold at HxW to fp32 and int8 ONNX and score both (repeatable)")
    p.add_argument("--compare", default=None, metavar="ROOT",
                   help="print the fold means of every recipe under ROOT instead of training")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if args.compare:
        text = compare(Path(args.compare))
        (Path(args.compare) / "compare.md").write_text(text)
        print(text, end="")
        return 0
    if not args.data:
        raise SystemExit("unet-folds: --data is required to train the folds")
    out = Path(args.out) / args.recipe
    sequences = [s for s in args.folds.split(",") if s]
    reports = {s: run_fold(args.recipe, s, args.data, out / s, extra) for s in sequences}
    table = fold_table(args.recipe, reports, extra)
    (out / "folds.json").write_text(json.dumps(table, indent=1))
    text = markdown(table)
    (out / "folds.md").write_text(text)
    print(text, end="")
    for hw in args.onnx:
        print(onnx_tables(args.recipe, args.data, out, reports, hw, extra), end="")
    return 0


def onnx_tables(recipe: str, data: str, out: Path, reports: dict[str, dict[str, Any]], hw: tuple[int, int],
                extra: list[str]) -> str:
    """Fold tables of the exported fp32 and int8 files at ``hw``, and int8's distance from fp32."""
    from unet_perception.training.fold_onnx import score_fold_onnx, size_tag

    scored = {s: score_fold_onnx(out / s, data, hw) for s in reports}
    tables = {}
    for kind in ("fp32", "int8"):
        # the time row stays the fold's training time
        table = fold_table(recipe, {s: {**scored[s][kind], "minutes": reports[s]["minutes"]} for s in reports}, extra)
        table["description"] += f"; ONNX {kind} exported at {size_tag(hw)}"
        tables[kind] = table
    gap = (tables["int8"]["mean_iou"] - tables["fp32"]["mean_iou"]) * 100
    (out / f"folds_onnx_{size_tag(hw)}.json").write_text(json.dumps({**tables, "int8_minus_fp32_points": gap},
                                                                    indent=1))
    text = "\n".join(markdown(t) for t in tables.values()) + f"\nint8 - fp32 on the fold mean: {gap:+.2f} points\n"
    (out / f"folds_onnx_{size_tag(hw)}.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
