"""Export a trained U-Net to the ONNX model contract and check it against torch.

    unet-export runs/camvid/best.pt models/unet_camvid.onnx --check-data ../shared/data/camvid

The graph takes uint8 [N, H, W, 3] RGB, scales to [0, 1] and argmaxes inside, so every runtime
(ONNX Runtime, TensorRT) gets exactly the same pre- and post-processing. The batch axis is dynamic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unet_perception import __version__
from unet_perception.atomic_file import replacing
from unet_perception.class_table import ClassTable
from unet_perception.contract_graph import make_tensorrt_ready
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, make_metadata
from unet_perception.onnx_rules import check_tensorrt_rules
from unet_perception.torch_contract import ContractWrapper, checkpoint_table, load_checkpoint
from unet_perception.training.train import parse_size

MIN_AGREEMENT = 0.999
OPSET = 17


def export_onnx(model: nn.Module, path: str | Path, table: ClassTable, input_hw: tuple[int, int], *,
                metrics: dict | None = None, training: dict | None = None) -> Path:
    """Write ``model`` to ``path`` following the contract, with metadata; returns the path."""
    import onnx

    path = Path(path)
    wrapper = ContractWrapper(model).cpu().eval()  # eval the wrapper: export restores its mode onto model
    example = torch.zeros(1, *input_hw, 3, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as private, torch.inference_mode():  # a 0700 folder of our own
        traced = Path(private) / "traced.onnx"
        torch.onnx.export(wrapper, (example,), str(traced), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME, CONFIDENCE_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                                        CONFIDENCE_NAME: {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        proto = make_tensorrt_ready(onnx.load(str(traced)))  # constant Resize scales, static output H and W
    del proto.metadata_props[:]
    for key, value in make_metadata(table, input_hw, metrics=metrics, training=training,
                                    version=__version__).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "unet_perception"
    onnx.checker.check_model(proto)
    problems = check_tensorrt_rules(proto)
    if problems:  # every model we write must build in TensorRT; a graph it refuses is an export bug
        raise RuntimeError("the exported graph breaks TensorRT's ONNX rules: " + "; ".join(problems))
    with replacing(path) as f:
        f.write(proto.SerializeToString())
    return path


def label_agreement(model: nn.Module, onnx_path: str | Path, frames: np.ndarray) -> float:
    """Fraction of pixels where torch and ONNX Runtime give the same label on ``frames`` (uint8 NHWC)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapper = ContractWrapper(model).cpu().eval()
    with torch.inference_mode():
        expected = wrapper(torch.from_numpy(frames))[0].numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: frames})[0]
    return float((expected == got).mean())


def check_frames(data: str | None, table: ClassTable, input_hw: tuple[int, int], count: int,
                 seed: int = 0) -> tuple[np.ndarray, str]:
    """Real frames from the dataset's val split resized to the input, or random noise when no data."""
    import cv2

    if data:
        from unet_perception.training.data import SegmentationDataset
        ds = SegmentationDataset(data, table, "val", limit=count)
        h, w = input_hw
        return np.stack([cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR) for img in ds.images]), \
            f"{len(ds)} val frames of {data}"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, *input_hw, 3), dtype=np.uint8), f"{count} random frames"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint (best.pt / last.pt)")
    p.add_argument("output", help="ONNX file to write")
    p.add_argument("--check-data", default=None,
                   help="dataset root whose val frames check torch/ONNX agreement (default: random frames)")
    p.add_argument("--check-frames", type=int, default=8, help="frames used for the agreement check")
    p.add_argument("--input-size", type=parse_size, default=None, metavar="HxW",
                   help="export at this input size instead of the one trained at (e.g. 240x320 for speed; "
                        "evaluate the result: accuracy changes with the size)")
    p.add_argument("--metrics", default=None,
                   help="evaluate's JSON report to embed as the model's metrics (default: training's best val)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, ckpt = load_checkpoint(args.checkpoint)
        table = checkpoint_table(ckpt)
    except FileNotFoundError as exc:
        print(f"unet-export: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - torch.load: UnpicklingError, EOFError, RuntimeError; other dicts: KeyError
        why = " | ".join(f"{type(exc).__name__}: {exc}".splitlines())
        print(f"unet-export: error: '{args.checkpoint}' is not a unet-train checkpoint ({why})", file=sys.stderr)
        return 1
    input_hw = args.input_size or tuple(ckpt["input_size"])
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text())
    else:
        best = [h for h in ckpt["history"] if "val" in h]
        metrics = max(best, key=lambda h: h["val_miou"])["val"] if best else {}
    training = {k: v for k, v in ckpt["args"].items() if isinstance(v, (str, int, float, bool, list, tuple))}
    training.update(epochs_trained=ckpt["epoch"] + 1, model_config=ckpt["model_config"])
    path = export_onnx(model, args.output, table, input_hw, metrics=metrics, training=training)  # type: ignore[arg-type]
    frames, what = check_frames(args.check_data, table, input_hw, args.check_frames)  # type: ignore[arg-type]
    agreement = label_agreement(model, path, frames)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB), input {input_hw[0]}x{input_hw[1]}, "
          f"{table.num_classes} classes; torch vs ONNX Runtime labels agree on {agreement:.5%} of pixels "
          f"({what})")
    if agreement < MIN_AGREEMENT:
        bad = path.with_name(path.name + ".rejected")
        path.replace(bad)
        print(f"error: agreement {agreement:.5%} is below {MIN_AGREEMENT:.1%}; the export is wrong. "
              f"Moved the file to '{bad}'.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
