"""Time each stage of the runtime path for one 640x480 camera on this machine (ONNX Runtime, CPU).

    python benchmarks/pipeline.py [--model models/unet_camvid.onnx] [--iterations 50] [--threads 0]

Uses the shipped model when present, else exports the seed-size U-Net (random weights; speed does not
depend on them) at 240x320. Prints mean and p99 per stage; inference is per frame at batch 1 and 4.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage
from std_msgs.msg import Header

from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.codec import decode, decode_compressed, decode_image, encode_image
from unet_perception.pipeline import OUTPUT_KINDS, Segmenter, preprocess, upscale_labels

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "unet_camvid.onnx"
CAMVID_VAL = REPO.parent / "shared" / "data" / "camvid" / "val"
FRAME_HW = (480, 640)


def seed_model(folder: Path) -> Path:
    """The seed's U-Net (32..512 filters) exported at 240x320 with random weights."""
    from unet_perception.class_table import load_class_table
    from unet_perception.training.export import export_onnx
    from unet_perception.networks.seed_unet import UNet

    table = load_class_table("camvid")
    return export_onnx(UNet(table.num_classes).eval(), folder / "seed_unet_240x320.onnx", table, (240, 320))



def model_or_default(model: Path | None, folder: Path) -> tuple[Path, str]:
    """``model``, else the shipped model, else the seed-size U-Net exported into ``folder``; and its name for tables."""
    if model is not None:
        return model, str(model)
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL, f"shipped {SHIPPED_MODEL.relative_to(REPO)}"
    return seed_model(folder), "seed-size U-Net exported now (random weights; no shipped model)"


def camera_frame() -> tuple[np.ndarray, str]:
    """A 640x480 RGB road frame (CamVid val upscaled) or, without the data, smooth noise."""
    for path in sorted(CAMVID_VAL.glob("*.png"))[:1]:
        bgr = cv2.imread(str(path))
        if bgr is not None:
            rgb = cv2.cvtColor(cv2.resize(bgr, FRAME_HW[::-1], interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
            return rgb, f"CamVid {path.name}"
    noise = np.random.default_rng(0).integers(0, 256, (*FRAME_HW, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 4), "synthetic smooth noise"


def measure(fn: Callable[[], object], iterations: int, per: int = 1) -> tuple[float, float]:
    """(mean, p99) in ms per item over ``iterations`` calls after one warm-up; ``per`` items per call."""
    fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3 / per)
    return float(np.mean(times)), float(np.percentile(times, 99))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help=f"ONNX model (default: {SHIPPED_MODEL} if present)")
    p.add_argument("--iterations", type=int, default=50, help="timed calls per codec/pipeline stage")
    p.add_argument("--infer-iterations", type=int, default=5, help="timed calls per inference batch size")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_or_default(args.model, Path(tmp))
        backend = create_backend("onnxruntime", model, BackendOptions(max_batch=4, threads=args.threads))
        with backend:
            segmenter = Segmenter(backend, backend.info.classes)
            frame, source = camera_frame()
            h, w = backend.input_hw
            header = Header(frame_id="camera")
            rgb_msg = encode_image(frame, "rgb8", header)
            bgr_msg = encode_image(np.ascontiguousarray(frame[:, :, ::-1]), "bgr8", header)
            jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            jpeg_msg = CompressedImage(header=header, format="rgb8; jpeg compressed bgr8", data=jpeg.tobytes())
            batch4 = preprocess([frame] * 4, (h, w))
            small = backend.infer(batch4[:1]).labels[0]
            labels = upscale_labels(small, FRAME_HW)
            rendered = segmenter.outputs(frame, labels)
            ni, n = args.infer_iterations, args.iterations
            n_out = len(OUTPUT_KINDS) - (not backend.info.has_confidence)  # confidence only from models with it

            def full_path() -> None:  # what the node's worker does per bgr8 frame, minus ROS transport
                rgb = decode(bgr_msg, use_cv_bridge=False)
                seg = segmenter.run([rgb])[0]
                for array, encoding in segmenter.render(rgb, seg, OUTPUT_KINDS, overlay_encoding="bgr8").values():
                    encode_image(array, encoding, header)

            rows = [
                ("infer, batch 1 (per frame)", measure(lambda: backend.infer(batch4[:1]), ni), ni),
                ("infer, batch 4 (per frame)", measure(lambda: backend.infer(batch4), ni, per=4), ni),
                ("decode Image rgb8", measure(lambda: decode_image(rgb_msg, use_cv_bridge=False), n), n),
                ("decode Image bgr8", measure(lambda: decode_image(bgr_msg, use_cv_bridge=False), n), n),
                (f"decode CompressedImage JPEG ({jpeg.size // 1024} KiB)",
                 measure(lambda: decode_compressed(jpeg_msg), n), n),
                (f"preprocess 640x480 -> {w}x{h}", measure(lambda: preprocess([frame], (h, w)), n), n),
                (f"upscale labels {w}x{h} -> 640x480", measure(lambda: upscale_labels(small, FRAME_HW), n), n),
                ("colour + overlay (outputs)", measure(lambda: segmenter.outputs(frame, labels, alpha=0.5), n), n),
                ("encode_image mono8 + rgb8 + rgb8",
                 measure(lambda: (encode_image(labels, "mono8", header),
                                  encode_image(rendered.color, "rgb8", header),  # type: ignore[arg-type]
                                  encode_image(rendered.overlay, "rgb8", header)), n), n),  # type: ignore[arg-type]
                (f"full path bgr8 in, {n_out} images out, batch 1", measure(full_path, ni), ni),
            ]

    print(f"model: {what}, input {w}x{h}, {backend.info.classes.num_classes} classes")
    print(f"frame: 640x480 ({source}); backend onnxruntime on {backend.device}, threads "
          f"{args.threads or 'default'}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'stage':<{width}} | mean ms | p99 ms | calls |\n|{'-' * (width + 2)}|--------:|-------:|------:|")
    for name, (mean, p99), calls in rows:
        print(f"| {name:<{width}} | {mean:7.2f} | {p99:6.2f} | {calls:5d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
