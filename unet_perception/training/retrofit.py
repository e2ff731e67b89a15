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
import contextlib
import sys
from pathlib import Path

import numpy as np

from unet_perception.atomic_file import replacing
from unet_perception.contract_graph import make_tensorrt_ready
from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, ModelError, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules


def retrofitted(src: str | Path) -> bytes:
    """The TensorRT-ready version of ``src`` (metadata kept), serialised; raises RuntimeError on a rule."""
    import onnx

    model = make_tensorrt_ready(onnx.load(str(src)))
    onnx.checker.check_model(model)
    problems = check_tensorrt_rules(model)
    if problems:
        raise RuntimeError(f"'{src}' still breaks TensorRT's rules after surgery: " + "; ".join(problems))
    return model.SerializeToString()


def retrofit(src: str | Path, dst: str | Path) -> Path:
    """Write the TensorRT-ready version of ``src`` to ``dst``, whole or not at all."""
    blob = retrofitted(src)
    with replacing(dst) as f:
        f.write(blob)
    return Path(dst)


def labels_of(model: Path | bytes, frames: np.ndarray, basic: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if basic:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
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

    try:
        return _retrofit_checked(Path(args.source), Path(args.output), args.check_data)
    except (ModelError, RuntimeError, OSError, onnx.checker.ValidationError) as exc:
        print(f"error: retrofit: {' | '.join(str(exc).splitlines())}; nothing written", file=sys.stderr)
        return 1


def _retrofit_checked(src: Path, dst: Path, check_data: str | None) -> int:
    info = read_model_info(src)
    if dst.is_dir():
        raise OSError(f"'{dst}' is a folder; give the ONNX file to write")
    made: list[Path] = []  # the folders this run makes for the output, outermost first
    try:
        for folder in reversed([dst.parent, *dst.parent.parents]):
            if not folder.exists():
                try:
                    folder.mkdir()
                    made.append(folder)
                except FileExistsError:  # made by someone else meanwhile: theirs
                    pass
        _check_and_write(src, dst, info.input_hw, check_data)
    except BaseException:
        for folder in reversed(made):  # they go again, if still empty: nothing is left behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return 0


def _check_and_write(src: Path, dst: Path, input_hw: tuple[int, int], check_data: str | None) -> None:
    with replacing(dst) as f:  # opened first: an output that cannot be written is said before the slow check
        if check_data:
            from unet_perception.training.quantize import frames_of

            frames, what = np.stack(frames_of(check_data, "val", input_hw, None)), "val frames"
        else:
            frames = np.random.default_rng(0).integers(0, 256, (8, *input_hw, 3), dtype=np.uint8)
            what = "random frames"
        old = {basic: labels_of(src, frames, basic) for basic in (True, False)}
        blob = retrofitted(src)  # checked in memory, written only when it computes the same
        equal = {basic: float((labels_of(blob, frames, basic) == old[basic]).mean()) for basic in (True, False)}
        print(f"{src} -> {dst}: labels equal to the old file on {len(frames)} {what}: {equal[True]:.5%} with ONNX "
              f"Runtime's basic graph optimizations, {equal[False]:.5%} with its default ones")
        if equal[True] < 1.0:
            raise RuntimeError("the surgery changed what the graph computes")  # the temporary file is removed
        f.write(blob)


if __name__ == "__main__":
    sys.exit(main())
