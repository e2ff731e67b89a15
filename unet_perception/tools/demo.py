"""unet-demo (``make demo``): road frames -> rosbag2 -> the segmentation node -> recorded bag, PNGs, summary.

1. makes a rosbag2 from an image folder (CamVid val by default) with ``unet-bag from-images``; on a clone
   without that folder (no ``../shared`` beside it) it says so and uses synthetic road-like frames
   (``camera_sim.synthetic_frame``) instead, so the demo always runs; mIoU needs real frames with labels;
2. starts the node exactly as ``launch/seg.launch.py`` does (``config/seg.yaml``, Fast DDS profile), through
   ``launch_support``;
3. replays the bag with ``unet-bag play`` and records every output the node publishes for the camera (labels,
   confidence for models with it, color, overlay, label_info) and ``/diagnostics`` into a bag
   (``recorded_topics``, which is also the list the demo prints);
4. writes a few overlay PNGs and prints frames in/out, fps, latency, drops and mIoU where ground truth exists.

``--ground`` also turns on the ground projection with an assumed camera (``demo_ground``: CamVid has no
calibration), records ``points`` and ``ground_grid`` too and draws the last grid as ``ground_grid.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.typesys import get_types_from_msg

from unet_perception import launch_support
from unet_perception.model_contract import ModelError
from unet_perception.backends.factory import KINDS
from unet_perception.tools import demo_ground
from unet_perception.tools.bag import (
    IMAGE,
    BagError,
    bag_from_images,
    list_images,
    staged_writer,
    typestore,
)
from unet_perception.tools.bag_play import play_bag
from unet_perception.topics import LABEL_INFO, output_kinds, output_topics

TOPIC = "/camera/image_raw"
DIAGNOSTICS, DIAGNOSTICS_TYPE = "/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"
LABEL_INFO_TYPE = "vision_msgs/msg/LabelInfo"
# rosbags' Jazzy store has no vision_msgs: its two messages the node publishes, as vision_msgs (and our stand-in,
# interfaces/vision_msgs) define them, so the bag carries their definitions and ros2 bag reads it
VISION_MSGS = {"vision_msgs/msg/VisionClass": "uint16 class_id\nstring class_name\n",
               LABEL_INFO_TYPE: "std_msgs/Header header\nVisionClass[] class_map\nfloat32 threshold\n"}
DEFAULT_IMAGES = "../shared/data/camvid/val"
NODE_START_TIMEOUT_S = 60.0


class DemoError(RuntimeError):
    """The demo cannot run, with what to do about it."""


@dataclass
class Summary:
    """The demo's figures (also written to ``summary.json``)."""

    frames_in: int = 0
    frames_out: int = 0
    node_frames_in: int = 0
    node_drops: int = 0
    node_errors: int = 0
    seconds: float = 0.0
    fps_out: float = 0.0
    latency_mean_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    node_latency_mean_ms: float = float("nan")
    node_latency_p99_ms: float = float("nan")
    miou: float | None = None
    miou_frames: int = 0
    backend: str = ""
    device: str = ""
    pngs: list[str] = field(default_factory=list)
    ground_clouds: int = 0      # --ground: points messages received
    ground_grids: int = 0       # --ground: ground_grid messages received
    ground_cells: dict[str, int] = field(default_factory=dict)  # of the last grid: free, obstacle, unknown
    written: list[str] = field(default_factory=list)  # what the run wrote into its output folder, in order

    def table(self) -> str:
        def ms(v: float) -> str:
            return "n/a" if np.isnan(v) else f"{v:.1f} ms"

        rows = [
            ("frames in (published)", str(self.frames_in)),
            ("frames out (labels received)", str(self.frames_out)),
            ("frames the node received", str(self.node_frames_in)),
            ("drops (stale frames skipped)", str(self.node_drops)),
            ("bad-input / inference errors", str(self.node_errors)),
            ("output rate", f"{self.fps_out:.2f} fps over {self.seconds:.1f} s"),
            ("latency end to end, mean / p99", f"{ms(self.latency_mean_ms)} / {ms(self.latency_p99_ms)}"),
            ("latency in the node, mean / p99", f"{ms(self.node_latency_mean_ms)} / {ms(self.node_latency_p99_ms)}"),
            ("mIoU vs ground truth", "n/a (no ground truth)" if self.miou is None
             else f"{100 * self.miou:.1f}% over {self.miou_frames} frames"),
            ("backend", f"{self.backend} on {self.device}"),
        ]
        if self.ground_grids or self.ground_clouds:
            rows.append(("ground points / grids received", f"{self.ground_clouds} / {self.ground_grids}"))
            rows.append(("last grid cells free/obstacle/unknown", "/".join(
                str(self.ground_cells.get(k, 0)) for k in ("free", "obstacle", "unknown"))))
        width = max(len(k) for k, _ in rows)
        line = "-" * (width + 30)
        return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def synthetic_frames(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> Path:
    """Write ``count`` synthetic 640x480 road-like PNG frames into ``folder`` (made anew each run)."""
    from unet_perception.tools.camera_sim import synthetic_frame

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"frame_{i:04d}.png"), cv2.cvtColor(synthetic_frame(*size, i), cv2.COLOR_RGB2BGR))
    return folder


def ground_truth_dir(images: Path) -> Path | None:
    """CamVid's layout: labels of ``val/`` live in ``valannot/`` with the same file names."""
    annot = images.parent / f"{images.name}annot"
    return annot if annot.is_dir() else None


def recorded_topics(has_confidence: bool, ground: bool) -> dict[str, str]:
    """Topic -> message type of everything the demo records: every output the node publishes for ``TOPIC`` (its
    images, ``label_info`` when vision_msgs is installed, as the node needs it too; with ``ground`` the points and
    the grid) and ``/diagnostics``. What the demo says it records is this list."""
    from unet_perception.node import LabelInfo  # None when vision_msgs is missing: the node publishes none then

    outputs = output_topics(TOPIC, output_kinds(has_confidence))
    topics = {topic: IMAGE for topic in outputs.values()}
    if LabelInfo is not None:
        topics[output_topics(TOPIC, [LABEL_INFO])[LABEL_INFO]] = LABEL_INFO_TYPE
    if ground:
        topics.update(demo_ground.TOPICS)
    topics[DIAGNOSTICS] = DIAGNOSTICS_TYPE
    return topics


class Recorder:
    """Subscribes to ``topics`` (name -> message type, ``recorded_topics``); writes every message into a bag as it
    arrives, counts them and keeps the last of each.

    Callbacks run in the thread that spins (sqlite3 bag writers stay in the thread that opened them) and
    only write and keep messages, so receive times stay accurate; scoring happens after the run.
    """

    def __init__(self, node: Any, writer: Any, topics: dict[str, str]) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        self.store = typestore()
        for name, text in VISION_MSGS.items():
            self.store.register(get_types_from_msg(text, name))
        self.topics = list(topics)                 # what is recorded, in order
        self.received: dict[int, float] = {}       # labels stamp -> monotonic receive time
        self.labels: dict[int, Any] = {}           # labels stamp -> sensor_msgs/Image (rosbags)
        self.overlays: list[Any] = []
        self.diagnostics: dict[str, str] = {}      # the latest /diagnostics values of our camera
        self.counts: dict[str, int] = dict.fromkeys(topics, 0)
        self.last: dict[str, bytes] = {}
        self._writer = writer
        self._kinds = {topic: kind for kind, topic in output_topics(TOPIC, ("labels", "overlay")).items()}
        qos = {IMAGE: QoSProfile(depth=100, reliability=ReliabilityPolicy.BEST_EFFORT),
               DIAGNOSTICS_TYPE: QoSProfile(depth=10),
               # published once, transient local, when the node activates: a late subscriber still gets it
               LABEL_INFO_TYPE: QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                           durability=DurabilityPolicy.TRANSIENT_LOCAL)}
        self._conns = {}
        for topic, msgtype in topics.items():
            package, _, name = msgtype.split("/")  # "nav_msgs/msg/OccupancyGrid"
            msg_class = getattr(importlib.import_module(f"{package}.msg"), name)
            self._conns[topic] = writer.add_connection(topic, msgtype, typestore=self.store)
            node.create_subscription(msg_class, topic, lambda raw, t=topic: self._on_message(t, raw),
                                     qos.get(msgtype, qos[IMAGE]), raw=True)

    def _on_message(self, topic: str, raw: bytes) -> None:
        now = time.monotonic()
        self._writer.write(self._conns[topic], time.time_ns(), raw)
        self.counts[topic] += 1
        self.last[topic] = raw
        kind = self._kinds.get(topic)
        if kind == "labels":
            msg: Any = self.store.deserialize_cdr(raw, IMAGE)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            self.received[stamp] = now
            self.labels[stamp] = msg
        elif kind == "overlay":
            self.overlays.append(self.store.deserialize_cdr(raw, IMAGE))
        elif topic == DIAGNOSTICS:
            diag: Any = self.store.deserialize_cdr(raw, DIAGNOSTICS_TYPE)
            for status in diag.status:
                if status.hardware_id == TOPIC:
                    self.diagnostics = {kv.key: kv.value for kv in status.values}


def listing(names: Sequence[str]) -> str:
    """``a, b and c`` (``names`` not empty)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def score(labels: dict[int, Any], frames: dict[int, Path], truth_dir: Path | None, classes: Any) -> tuple[float, int]:
    """(mIoU, frames scored) of the node's label messages against ``truth_dir``, matched by header stamp.

    Pixels the node labelled unknown (255, under ``unknown_threshold``) are misses of their true class, not
    predictions of some class: they go to an extra last column, which no truth row is, so it is never averaged.
    """
    from unet_perception.metrics import confusion_matrix, mean_iou

    n = classes.num_classes
    cm = np.zeros((n + 1, n + 1), dtype=np.int64)
    scored = 0
    for stamp, msg in labels.items():
        truth_path = truth_dir / frames[stamp].name if truth_dir and stamp in frames else None
        truth = cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE) if truth_path and truth_path.is_file() else None
        pred = msg.data.reshape(msg.height, msg.step)[:, : msg.width]
        if truth is None or truth.shape != pred.shape:
            continue
        truth = np.where(truth < n, truth.astype(np.int64), -1)  # ids beyond the classes (void) are not scored
        cm += confusion_matrix(truth, np.minimum(pred, n), n + 1, classes.ignore_index)
        scored += 1
    return mean_iou(cm), scored


def _start_node(model: Path, backend: str, log_path: Path, extra: dict[str, Any] | None = None) \
        -> subprocess.Popen[bytes]:
    """The node as ``seg.launch.py`` starts it: ``config/seg.yaml`` then the overrides, Fast DDS env."""
    overrides = launch_support.parameter_overrides(model=str(model), backend=backend, image_topics=TOPIC)
    overrides.update(extra or {})
    cmd = launch_support.node_command(launch_support.default_params_file(), overrides)
    env = os.environ | launch_support.node_env()
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for_node(ros: Any, proc: subprocess.Popen[bytes], topics: Sequence[str], log_path: Path) -> None:
    """Until the node subscribes to the camera and publishes on every one of ``topics`` (model loaded and warmed
    up)."""
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the node exited with code {proc.returncode} during start-up:\n"
                            f"{_tail(log_path)}")
        if ros.count_subscribers(TOPIC) and all(ros.count_publishers(t) for t in topics):
            time.sleep(0.5)  # let discovery match our subscriptions on the node's side too
            return
        time.sleep(0.1)
    raise DemoError(f"the node did not come up within {NODE_START_TIMEOUT_S:.0f} s; its log:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _write_pngs(overlays: list[Any], out: Path, count: int) -> list[str]:
    """``overlay_000.png``...: ``count`` overlays spread over the run."""
    if not overlays or count <= 0:
        return []
    picks = np.unique(np.linspace(0, len(overlays) - 1, min(count, len(overlays))).round().astype(int))
    names = []
    for i, idx in enumerate(picks):
        msg = overlays[idx]
        pixels = msg.data.reshape(msg.height, msg.step)[:, : msg.width * 3].reshape(msg.height, msg.width, 3)
        bgr = pixels if msg.encoding == "bgr8" else cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        path = out / f"overlay_{i:03d}.png"
        cv2.imwrite(str(path), bgr)
        names.append(str(path))
    return names


def _float(diag: dict[str, str], key: str) -> float:
    try:
        return float(diag.get(key, "nan"))
    except ValueError:
        return float("nan")


def run_demo(images: Path, out: Path, model: Path, *, backend: str = "auto", frames: int = 50, rate: float = 5.0,
             pngs: int = 4, drain_s: float = 5.0, ground: bool = False) -> Summary:
    """The whole demo; returns its summary (also printed by ``main`` and written to ``out/summary.json``)."""
    from unet_perception.model_contract import read_model_info

    if not model.is_file():
        raise DemoError(f"no model at {model}. The shipped model models/unet_camvid.onnx comes from training "
                        "(make model: unet-train, then unet-export); or pass --model PATH to any exported .onnx")
    info = read_model_info(model)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []  # what this run writes into out, by name, in order: the "outputs:" line
    if not images.exists():
        print(f"[0/4] no image folder at {images} (a clone without ../shared/data): using synthetic frames; "
              "for real road frames and an mIoU pass IMAGES=<folder of .png/.jpg frames>")
        images = synthetic_frames(out / "synthetic_frames", frames)
        written.append("synthetic_frames")
    files = list_images(images, frames)
    truth_dir = ground_truth_dir(images)
    for old in [*out.glob("overlay_*.png"), out / "ground_grid.png", out / "input_bag", out / "output_bag"]:
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    print(f"[1/4] bag of {len(files)} frames from {images} at {rate:g} Hz -> {out / 'input_bag'}")
    stamps = bag_from_images(files, out / "input_bag", topic=TOPIC, rate=rate, frame_id="camera")
    by_stamp = dict(zip(stamps, files, strict=True))
    written.append("input_bag")

    launch_support.apply_node_env()  # this process publishes camera frames too
    import rclpy

    topics = recorded_topics(info.has_confidence, ground)
    log_path = out / "node.log"
    print(f"[2/4] starting the node ({launch_support.default_params_file()}, model {model}); log: {log_path}")
    if ground:
        print(f"      --ground: {demo_ground.ASSUMPTIONS}")
    proc = _start_node(model, backend, log_path, demo_ground.node_overrides() if ground else None)
    written.append(log_path.name)
    rclpy.init()
    ros = rclpy.create_node("unet_demo")
    if ground:  # as a camera driver would: the CameraInfo beside the image, repeated
        info_msg = demo_ground.camera_info(*demo_ground.frame_size(files[0]), frame_id="camera")
        info_pub = ros.create_publisher(type(info_msg), demo_ground.INFO_TOPIC, 10)
        ros.create_timer(0.5, lambda: info_pub.publish(info_msg))
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(ros)
    published: dict[int, float] = {}
    played: dict[str, Any] = {}

    def player() -> None:  # publishes from its own thread; this one spins (the bag writer is not thread-safe)
        try:
            played["stats"] = play_bag(ros, out / "input_bag", wait_for_subscribers=10.0,
                                       on_publish=lambda _t, ts: published.__setitem__(ts, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread and raised there
            played["error"] = exc

    def spin_while(busy: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while busy() and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)

    try:
        with staged_writer(out / "output_bag", "sqlite3") as writer:
            rec = Recorder(ros, writer, topics)
            _wait_for_node(ros, proc, [t for t in rec.topics if t != DIAGNOSTICS], log_path)
            print(f"[3/4] replaying through the node, recording {listing(rec.topics)}")
            thread = threading.Thread(target=player, name="player", daemon=True)
            thread.start()
            spin_while(thread.is_alive, len(files) / rate * 2 + 30)
            if "error" in played:
                raise played["error"]
            # drain: outputs still in flight (until none came for drain_s), then a /diagnostics message that
            # has counted every output we received
            progress = [len(rec.received), time.monotonic()]

            def draining() -> bool:
                if len(rec.received) != progress[0]:
                    progress[:] = [len(rec.received), time.monotonic()]
                return len(rec.received) < len(published) and time.monotonic() - progress[1] < drain_s

            spin_while(draining, 60.0)
            spin_while(lambda: int(rec.diagnostics.get("frames_out", 0)) < len(rec.received), 3.0)
            diag, received = rec.diagnostics, rec.received
    finally:
        executor.shutdown()
        ros.destroy_node()
        rclpy.try_shutdown()
        _stop(proc)
    written.append("output_bag")
    stats = played["stats"]
    if not received:
        raise DemoError(f"the node published no labels for {len(published)} frames; its log:\n{_tail(log_path)}")
    lat = np.array([(received[s] - published[s]) * 1000 for s in received if s in published])
    seconds = max(received.values()) - min(published.values())
    summary = Summary(
        frames_in=stats.published[TOPIC], frames_out=len(received), node_frames_in=int(diag.get("frames_in", 0)),
        node_drops=int(diag.get("drops", 0)), node_errors=int(diag.get("errors", 0)), seconds=seconds,
        fps_out=len(received) / seconds if seconds > 0 else 0.0, latency_mean_ms=float(lat.mean()),
        latency_p99_ms=float(np.percentile(lat, 99)), node_latency_mean_ms=_float(diag, "latency_mean_ms"),
        node_latency_p99_ms=_float(diag, "latency_p99_ms"), backend=diag.get("backend", "?"),
        device=diag.get("device", "?"))
    miou, scored = score(rec.labels, by_stamp, truth_dir, info.classes)
    if scored:
        summary.miou, summary.miou_frames = miou, scored
    summary.pngs = _write_pngs(rec.overlays, out, pngs)
    if ground:
        summary.ground_clouds = rec.counts[demo_ground.POINTS_TOPIC]
        summary.ground_grids = rec.counts[demo_ground.GRID_TOPIC]
        if demo_ground.GRID_TOPIC in rec.last:
            grid: Any = rec.store.deserialize_cdr(rec.last[demo_ground.GRID_TOPIC],
                                                  demo_ground.TOPICS[demo_ground.GRID_TOPIC])
            summary.pngs.append(demo_ground.grid_png(grid, out / "ground_grid.png"))
            cells = np.asarray(grid.data, np.int8)
            summary.ground_cells = {"free": int((cells == 0).sum()), "obstacle": int((cells == 100).sum()),
                                    "unknown": int((cells == -1).sum())}
    print(f"[4/4] wrote {out / 'output_bag'} ({sum(rec.counts.values())} messages)"
          + (f" and {listing([Path(p).name for p in summary.pngs])}" if summary.pngs else ""))
    summary.written = [*written, *(Path(p).name for p in summary.pngs), "summary.json"]
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2, default=str) + "\n")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=Path(os.environ.get("IMAGES") or DEFAULT_IMAGES),
                        help="folder of road frames (default: $IMAGES or %(default)s); ground truth is read "
                             "from <folder>annot/ when it exists (CamVid layout)")
    parser.add_argument("--model", type=Path, default=None,
                        help="ONNX model (default: the package's models/unet_camvid.onnx)")
    parser.add_argument("--backend", default="auto", choices=KINDS,
                        help="node backend (default: %(default)s, as in config/seg.yaml)")
    parser.add_argument("--frames", type=int, default=50, help="frames to replay (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz (default: %(default)s)")
    parser.add_argument("--pngs", type=int, default=4, help="overlay PNGs to write (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    parser.add_argument("--ground", action="store_true",
                        help="also project the labels onto flat ground (points, ground_grid, ground_grid.png) with "
                             "an assumed camera: CamVid has no calibration (see unet_perception/tools/demo_ground.py)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model = args.model or launch_support.default_model_path()
    try:
        summary = run_demo(args.images, args.out, model, backend=args.backend, frames=args.frames,
                           rate=args.rate, pngs=args.pngs, ground=args.ground)
    except (DemoError, BagError, ModelError) as exc:
        print(f"unet-demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unet-demo: interrupted", file=sys.stderr)
        return 130
    print(summary.table())
    print(f"outputs: {args.out}/ ({', '.join(summary.written)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
