"""Bring a model exported before the TensorRT-ready contract up to it, by graph surgery, with the same weights.

    python -m unet_perception.training.retrofit models/unet_camvid.onnx new.onnx --check-data ../shared/data/camvid

What changes (contract_graph.make_tensorrt_ready): labels leave as ArgMax -> Cast(float) -> Cast(uint8) instead of
INT64 -> UINT8, and every Resize takes constant scales, so the outputs' H and W are static. Weights, metadata and
every other node stay as they are. The new file's labels are compared with the old file's in ONNX Runtime on val
frames (or random ones), with its graph optimizations at the basic level (the graphs must compute the same
thing: 100% equal) and at the default level (which fuses int8 Resize differently once its scales are constant).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from unet_perception.atomic_file import replacing
from unet_perception.contract_graph import make_tensorrt_ready
from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, ModelError, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules


def retrofit(src: str | Path, dst: str | Path) -> Path:
    """Write the TensorRT-ready version of ``src`` to ``dst`` (metadata kept); raises RuntimeError on a rule."""
    import onnx

    model = make_tensorrt_ready(onnx.load(str(src)))
    onnx.checker.check_model(model)
    problems = check_tensorrt_rules(model)
    if problems:
        raise RuntimeError(f"'{src}' still breaks TensorRT's rules after surgery: " + "; ".join(problems))
    dst = Path(dst)
    with replacing(dst) as tmp:
        onnx.save(model, str(tmp))
    return dst


def labels_of(path: Path, frames: np.ndarray, basic: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: frames[i:i + 4]})[0]
                           for i in range(0, len(frames), 4)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_perception.training.retrofit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="contract ONNX model exported before the change")
    p.add_argument("output", help="ONNX file to write (may be the source: written atomically)")
    p.add_argument("--check-data", default=None, help="CamVid root whose val frames compare old and new labels")
    args = p.parse_args(argv)
    import onnx

    dst, staged = Path(args.output), None
    try:
        # a fresh name beside OUT (was OUT.new, overwritten and deleted whatever that was)
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".retrofit.onnx", dir=dst.parent)
        os.close(fd)
        staged = Path(name)
        return _retrofit_checked(Path(args.source), dst, staged, args.check_data)
    except (ModelError, RuntimeError, OSError, onnx.checker.ValidationError) as exc:
        print(f"error: retrofit: {' | '.join(str(exc).splitlines())}; nothing written", file=sys.stderr)
        return 1
    finally:
        if staged is not None:
            staged.unlink(missing_ok=True)  # ours; renamed to OUT on success


def _retrofit_checked(src: Path, dst: Path, staged: Path, check_data: str | None) -> int:
    info = read_model_info(src)
    if check_data:
        from unet_perception.training.quantize import frames_of

        frames, what = np.stack(frames_of(check_data, "val", info.input_hw, None)), "val frames"
    else:
        frames = np.random.default_rng(0).integers(0, 256, (8, *info.input_hw, 3), dtype=np.uint8)
        what = "random frames"
    old = {basic: labels_of(src, frames, basic) for basic in (True, False)}
    retrofit(src, staged)
    equal = {basic: float((labels_of(staged, frames, basic) == old[basic]).mean()) for basic in (True, False)}
    print(f"{src} -> {dst}: labels equal to the old file on {len(frames)} {what}: {equal[True]:.5%} with ONNX "
          f"Runtime's basic graph optimizations, {equal[False]:.5%} with its default ones")
    if equal[True] < 1.0:
        print("error: the surgery changed what the graph computes; nothing written", file=sys.stderr)
        return 1
    staged.replace(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
