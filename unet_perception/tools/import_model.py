"""unet-import: wrap a foreign segmentation ONNX (mmsegmentation, segmentation_models_pytorch, torchvision,
PaddleSeg, TAO ...) into this package's model contract, so the node, unet-bag, label-many, unet-evaluate and
unet-build-engine run it like a model of our own.

    unet-import deeplab.onnx deeplab_contract.onnx --classes cityscapes --input-size 512x1024 \\
        --mean 123.675 116.28 103.53 --std 58.395 57.12 57.375

The result takes uint8 [N, H, W, 3] RGB frames; the preprocessing the source wants (channel order, mean and std
in 0-255 units, layout) and the postprocessing (bilinear resize of the scores to the input size, argmax,
confidence) are inside the graph. It is checked against the source model run by ONNX Runtime (with the same steps
done by NumPy and OpenCV) on frames from --check-images or synthetic ones: fewer than 99.5% equal labels and
nothing is written. docs/models.md has the line for each framework.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from unet_perception import __version__
from unet_perception.atomic_file import replacing
from unet_perception.class_table import ClassTable, load_class_table
from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, ModelError, make_metadata, read_model_bytes
from unet_perception.tools.import_graph import (
    OUTPUT_KINDS,
    ImportFailure,
    SourceInfo,
    Wrapping,
    detect_input_hw,
    detect_layout,
    detect_output,
    read_source,
    wrap,
)

MIN_AGREEMENT = 0.995
CHECK_FRAMES = 4


def parse_hw(text: str) -> tuple[int, int]:
    """'512x1024' -> (512, 1024): any positive size (a foreign model has its own constraints)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HEIGHTxWIDTH (e.g. 512x1024), got '{text}'") from None
    if not (0 < h <= 8192 and 0 < w <= 8192):
        raise argparse.ArgumentTypeError(f"size {h}x{w}: each side must be 1..8192")
    return h, w


def check_normalisation(mean: list[float], std: list[float]) -> None:
    if not all(math.isfinite(v) for v in [*mean, *std]):
        raise ImportFailure(f"--mean {mean} --std {std}: every value must be a finite number")
    if any(s == 0 for s in std):
        raise ImportFailure(f"--std {std}: a standard deviation of 0 divides by zero; give the model's std "
                            "(0-255 units, e.g. 58.395 57.12 57.375)")


def _session(model: Any) -> Any:
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for every malformed graph
        raise ImportFailure(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc


def source_input(frames: np.ndarray, how: Wrapping, dtype: Any) -> np.ndarray:
    """What the source model wants for uint8 RGB NHWC ``frames``, computed in NumPy."""
    x = (frames.astype(np.float32) - np.asarray(how.mean, np.float32)) / np.asarray(how.std, np.float32)
    if how.channels == "bgr":
        x = x[..., ::-1]
    if how.layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=dtype)


def reference_labels(out: np.ndarray, how: Wrapping) -> np.ndarray:
    """Labels at the input size from the source's raw output: OpenCV resize (bilinear scores, nearest labels)."""
    import cv2

    h, w = how.input_hw
    if how.output == "labels":
        maps = out.reshape(out.shape[0], *how.output_hw).astype(np.float32)
        return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in maps]).astype(np.int64)
    scores = out.astype(np.float32)
    if how.channel_axis == 3:
        scores = scores.transpose(0, 3, 1, 2)
    resized = np.stack([[cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in frame] for frame in scores])
    return resized.argmax(1)


def synthetic_frames(hw: tuple[int, int], count: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields with edges (coarse noise upscaled, plus fine noise): road-frame-like structure."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = hw
    frames = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.integers(-12, 13, img.shape, dtype=np.int16)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def check_frames(folder: str | None, hw: tuple[int, int], count: int) -> tuple[np.ndarray, str]:
    if folder is None:
        return synthetic_frames(hw, count), f"{count} synthetic frames"
    from unet_perception.image_files import list_image_files, read_rgb
    from unet_perception.pipeline import preprocess

    files = list_image_files(folder)[:count]
    if not files:
        raise ImportFailure(f"--check-images '{folder}' has no image files")
    return preprocess([read_rgb(f) for f in files], hw), f"{len(files)} frames of {folder}"


def agreement(source: Any, wrapped: bytes, src: SourceInfo, how: Wrapping, frames: np.ndarray,
              table: ClassTable) -> float:
    """Fraction of pixels where the wrapped model's labels equal the source's run by ONNX Runtime + NumPy/OpenCV."""
    from onnx import helper

    src_session, ours = _session(source), _session(wrapped)
    dtype = helper.tensor_dtype_to_np_dtype(src.input_type)
    step = 1 if how.batch == 1 else len(frames)
    expected, got = [], []
    for i in range(0, len(frames), step):
        batch = frames[i:i + step]
        raw = src_session.run([src.output_name], {src.input_name: source_input(batch, how, dtype)})[0]
        expected.append(reference_labels(raw, how))
        got.append(ours.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    ref, out = np.concatenate(expected), np.concatenate(got)
    if ref.max() >= table.num_classes:
        raise ImportFailure(f"the model labels pixels {int(ref.max())}, but table '{table.name}' has "
                            f"{table.num_classes} classes (ids 0..{table.num_classes - 1}); give the right --classes")
    return float((ref == out).mean())


def plan(model: Any, args: argparse.Namespace, table: ClassTable) -> tuple[SourceInfo, Wrapping]:
    """Read the source, detect what was not given, measure its output size at the input size."""
    src = read_source(model)
    layout = detect_layout(src, args.layout)
    hw = detect_input_hw(src, layout, args.input_size)
    output = detect_output(src, args.output)
    batch: int | str = 1 if src.input_dims[0] == 1 else "batch"
    probe = Wrapping(layout, args.channels, tuple(args.mean), tuple(args.std), hw, output, 1, hw, batch)
    from onnx import helper

    dtype = helper.tensor_dtype_to_np_dtype(src.input_type)
    try:
        out = _session(model).run([src.output_name], {src.input_name: source_input(
            np.zeros((1, *hw, 3), np.uint8), probe, dtype)})[0]
    except ImportFailure:
        raise
    except Exception as exc:  # noqa: BLE001 - a model that cannot run at this size
        raise ImportFailure(f"the model does not run on a {hw[0]}x{hw[1]} input: {str(exc).splitlines()[0]}") from exc
    if output == "labels":
        axis, out_hw = -1, out.shape[-2:] if out.ndim == 3 or out.shape[1] == 1 else None
        if out_hw is None:
            raise ImportFailure(f"output '{src.output_name}' has shape {list(out.shape)}; labels are N x H x W or "
                                "N x 1 x H x W (use --output logits for class scores)")
    else:
        if out.ndim != 4:
            raise ImportFailure(f"output '{src.output_name}' has shape {list(out.shape)}; class scores are "
                                "N x C x H x W")
        axis = 1 if out.shape[1] == table.num_classes or layout == "nchw" and out.shape[3] != table.num_classes \
            else 3
        classes = out.shape[axis]
        if classes != table.num_classes:
            raise ImportFailure(f"output '{src.output_name}' has {classes} classes (shape {list(out.shape)}), but "
                                f"table '{table.name}' has {table.num_classes}; give the matching --classes")
        out_hw = out.shape[2:4] if axis == 1 else out.shape[1:3]
    how = Wrapping(layout, args.channels, tuple(args.mean), tuple(args.std), hw, output, axis,
                   (int(out_hw[0]), int(out_hw[1])), batch)
    return src, how


def check_target(source: Path, out: Path) -> None:
    """ImportFailure before any work when OUT cannot take the model: a folder, or the source itself (by any name:
    writing it would replace the model being imported)."""
    if out.is_dir():
        raise ImportFailure(f"OUT '{out}' is a folder; give the path of the .onnx file to write")
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise ImportFailure(f"OUT '{out}' is the source model; give another path (the source is kept as it is)")


def write_model(out: Path, blob: bytes) -> None:
    """``blob`` at ``out``, whole or not at all (atomic_file); an OSError is an ImportFailure with nothing left
    behind."""
    try:
        with replacing(out) as f:
            f.write(blob)
    except OSError as exc:
        raise ImportFailure(f"cannot write '{out}': {exc.strerror or exc}; nothing written") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="IN.onnx", help="the foreign segmentation model (ONNX, one float image input)")
    p.add_argument("target", metavar="OUT.onnx", help="contract ONNX file to write")
    p.add_argument("--classes", required=True, metavar="NAME|FILE.json",
                   help="class table: camvid, cityscapes (19 train ids), ade20k (150), carla, or a class-table JSON")
    p.add_argument("--layout", choices=("nchw", "nhwc"), default=None,
                   help="the source input's layout (default: detected from which axis is 3)")
    p.add_argument("--channels", choices=("rgb", "bgr"), default="rgb",
                   help="channel order the source expects (frames stay RGB in the node; default rgb)")
    p.add_argument("--mean", type=float, nargs=3, default=[0.0, 0.0, 0.0], metavar=("R", "G", "B"),
                   help="per-channel mean in 0-255 units, in R G B order whatever --channels says (default 0)")
    p.add_argument("--std", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("R", "G", "B"),
                   help="per-channel std in 0-255 units, R G B order (default 1; a model taking 0-1 input: 255)")
    p.add_argument("--input-size", type=parse_hw, default=None, metavar="HxW",
                   help="input size; required when the source's H and W are dynamic")
    p.add_argument("--output", choices=OUTPUT_KINDS, default=None,
                   help="what the source outputs (default: detected; integer or N x H x W means labels, a Softmax "
                        "at the end probabilities, else logits)")
    p.add_argument("--check-images", default=None, metavar="DIR",
                   help="folder of frames to check the import on (default: synthetic frames)")
    p.add_argument("--check-frames", type=int, default=CHECK_FRAMES, help="how many frames to check")
    return p


def import_model(args: argparse.Namespace) -> str:
    """Write the wrapped model; returns the summary line. ImportFailure (nothing written) for anything wrong."""
    import onnx

    from unet_perception.contract_graph import make_tensorrt_ready
    from unet_perception.onnx_rules import check_tensorrt_rules

    check_normalisation(args.mean, args.std)
    try:
        table = load_class_table(args.classes)
    except (ValueError, KeyError, OSError) as exc:
        raise ImportFailure(f"--classes {args.classes}: {exc}") from exc
    source_path, out = Path(args.source), Path(args.target)
    if args.check_frames < 1:
        raise ImportFailure(f"--check-frames {args.check_frames}: the import is checked on at least 1 frame")
    check_target(source_path, out)
    try:
        data = read_model_bytes(source_path)  # a FIFO or device is named, never opened blocking
    except ModelError as exc:
        raise ImportFailure(str(exc)) from exc
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends: "not an ONNX model" either way
        raise ImportFailure(f"'{source_path}' is not a readable ONNX model ({type(exc).__name__})") from exc
    src, how = plan(model, args, table)
    wrapped = make_tensorrt_ready(wrap(onnx.load_from_string(data), src, how))
    imported = {"source": source_path.name, "sha256": hashlib.sha256(data).hexdigest(), "layout": how.layout,
                "channels": how.channels, "mean": list(how.mean), "std": list(how.std),
                "input_size": list(how.input_hw), "output": how.output, "source_output": src.output_name,
                "source_output_size": list(how.output_hw),
                "confidence": {"logits": "softmax of the logits", "probabilities": "the probabilities as given",
                               "labels": "none: the source gives labels only"}[how.output]}
    meta = make_metadata(table, how.input_hw, training={"imported_from": source_path.name}, version=__version__)
    for key, value in {**meta, "imported": json.dumps(imported)}.items():
        entry = wrapped.metadata_props.add()
        entry.key, entry.value = key, value
    wrapped.producer_name = "unet_perception unet-import"
    try:
        onnx.checker.check_model(wrapped)
    except onnx.checker.ValidationError as exc:
        raise ImportFailure(f"the wrapped graph is not valid ONNX: {str(exc).splitlines()[0]}") from exc
    problems = check_tensorrt_rules(wrapped)
    if problems:
        raise ImportFailure("the wrapped graph breaks TensorRT's ONNX rules: " + "; ".join(problems))
    blob = wrapped.SerializeToString()
    frames, what = check_frames(args.check_images, how.input_hw, args.check_frames)
    agree = agreement(model, blob, src, how, frames, table)
    if agree < MIN_AGREEMENT:
        raise ImportFailure(f"labels of the wrapped model equal the source's (ONNX Runtime + NumPy/OpenCV) on only "
                            f"{agree:.3%} of pixels over {what}; {MIN_AGREEMENT:.1%} needed; nothing written")
    write_model(out, blob)
    extra = f" (using output '{src.output_name}', the first of {src.output_count})" if src.output_count > 1 else ""
    note = ("; the source has a fixed batch of 1: run it with max_batch 1 (or export it with a dynamic batch)"
            if how.batch == 1 else "")  # the backends refuse batches larger than a fixed batch axis
    return (f"imported {source_path.name} -> {out}: input {how.input_hw[0]}x{how.input_hw[1]} {how.layout} "
            f"{how.channels}, {how.output} at {how.output_hw[0]}x{how.output_hw[1]}{extra}, {table.num_classes} "
            f"classes ({table.name}); confidence: {imported['confidence']}; labels equal the source's on "
            f"{agree:.3%} of pixels ({what}){note}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(import_model(args))
    except ImportFailure as exc:
        print(f"error: unet-import: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
