"""Raw backend time per frame vs the segmentation node end to end, for 640x480 cameras.

    python benchmarks/node_latency.py [--model models/unet_camvid.onnx] [--rounds 20] [--threads 0]

The node runs in-process with its default settings on a real rclpy graph (the node and the probe on a
single-threaded executor each), with subscribers on labels, colour and overlay (so all three outputs are
computed and published). Each round publishes one rgb8 frame per camera and waits for every overlay, so the
node never drops and the time per frame is ``round time / cameras`` (a lockstep round trip, not a sustained
rate: ``make bench`` measures those). "Node overhead" = node time per frame - raw inference (batch 1) per
frame: decode, preprocess, postprocess (upscale, colour, overlay), message encoding, publishing, the DDS hops
and, with 4 cameras, the node's two workers each inferring a frame on one thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as stages  # noqa: E402  (benchmarks/pipeline.py: model and frame helpers)

from unet_perception.backends.factory import BackendOptions, create_backend  # noqa: E402
from unet_perception.node import SegmentationNode  # noqa: E402
from unet_perception.pipeline import preprocess  # noqa: E402
from unet_perception.tools.camera_sim import image_message  # noqa: E402

OUTPUTS = ("labels", "color", "overlay")


def raw_ms_per_frame(model: Path, frame: np.ndarray, batch: int, threads: int, rounds: int) -> float:
    """Backend inference alone on an already preprocessed batch, ms per frame."""
    backend = create_backend("onnxruntime", model, BackendOptions(max_batch=batch, threads=threads))
    with backend:
        inputs = preprocess([frame] * batch, backend.input_hw)
        return stages.measure(lambda: backend.infer(inputs), rounds, per=batch)[0]


def node_ms_per_frame(model: Path, frame: np.ndarray, cameras: int, threads: int,
                      rounds: int) -> tuple[float, float, float]:
    """(ms per frame, receive->publish latency mean, p99 in ms) of the node with ``cameras`` cameras, its
    defaults otherwise (``threads`` 0 = the default)."""
    context = rclpy.Context()
    rclpy.init(context=context)
    topics = [f"/bench{i}/image_raw" for i in range(cameras)]
    node = SegmentationNode(context=context, parameter_overrides=[
        Parameter("model_path", value=str(model)), Parameter("image_topics", value=topics),
        Parameter("backend", value="onnxruntime"), Parameter("threads", value=threads)])
    probe = rclpy.create_node("bench_probe", context=context)
    received = threading.Semaphore(0)
    subs = [probe.create_subscription(Image, f"/bench{i}/segmentation/{kind}",
                                      (lambda _m: received.release()) if kind == "overlay" else (lambda _m: None),
                                      qos_profile_sensor_data)
            for i in range(cameras) for kind in OUTPUTS]
    pubs = [probe.create_publisher(Image, t, qos_profile_sensor_data) for t in topics]
    # One single-threaded executor each, as the node runs in production (rclpy's MultiThreadedExecutor serving both
    # delayed the probe's callbacks by 10-500 ms after the node had published: the figure measured the executor).
    executors = [SingleThreadedExecutor(context=context) for _ in range(2)]
    executors[0].add_node(node)
    executors[1].add_node(probe)
    spinners = [threading.Thread(target=e.spin, daemon=True) for e in executors]
    for spinner in spinners:
        spinner.start()
    try:
        deadline = time.monotonic() + 30
        while not (all(p.get_subscription_count() for p in pubs) and all(s.get_publisher_count() for s in subs)):
            if time.monotonic() > deadline:
                raise RuntimeError("benchmark graph did not connect within 30 s")
            time.sleep(0.01)
        msg = image_message(frame, "rgb8")
        times = []
        for r in range(rounds + 1):  # round 0 warms up
            start = time.perf_counter()
            for pub in pubs:
                pub.publish(msg)
            for _ in pubs:
                if not received.acquire(timeout=30):
                    raise RuntimeError("no overlay within 30 s")
            if r:
                times.append((time.perf_counter() - start) * 1e3 / cameras)
        latencies = np.concatenate([np.asarray(c.stats.latencies) for c in node._cameras]) * 1e3
        return float(np.mean(times)), float(latencies.mean()), float(np.percentile(latencies, 99))
    finally:
        for executor, spinner in zip(executors, spinners, strict=True):
            executor.shutdown()
            spinner.join(timeout=5)  # before any node goes: a spin still in flight would touch destroyed handles
        node.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=context)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help=f"ONNX model (default: {stages.SHIPPED_MODEL} if present, else the seed-size U-Net)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (one frame per camera each)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, what = stages.model_or_default(args.model, Path(tmp))
        frame, source = stages.camera_frame()
        rows = []
        for cameras in (1, 4):
            raw = raw_ms_per_frame(model, frame, 1, args.threads, args.rounds)
            node, lat_mean, lat_p99 = node_ms_per_frame(model, frame, cameras, args.threads, args.rounds)
            rows.append((cameras, raw, node, lat_mean, lat_p99))
    print(f"model: {what}; frames 640x480 rgb8 ({source}); onnxruntime CPU, threads {args.threads or 'default'}; "
          f"{platform.machine()}, {os.cpu_count()} cores; {args.rounds} rounds")
    print("\n| cameras | raw infer ms/frame | node ms/frame | overhead ms/frame | overhead % "
          "| latency mean ms | latency p99 ms |")
    print("|--------:|-------------------:|--------------:|------------------:|-----------:"
          "|----------------:|---------------:|")
    for cameras, raw, node, lat_mean, lat_p99 in rows:
        over = node - raw
        print(f"| {cameras:7d} | {raw:18.2f} | {node:13.2f} | {over:17.2f} | {100 * over / raw:9.1f}% "
              f"| {lat_mean:15.2f} | {lat_p99:14.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
