"""Load: several cameras at a fixed rate into the segmentation node for a while; memory, latency, drops.

    python benchmarks/load.py [--duration 600] [--cameras 4] [--rate 30] [--size 640x480] [--model M]

The node runs in its own process exactly as the launch file starts it (config/seg.yaml, the Fast DDS
large-frame profile) with this run's overrides. This process is the cameras and the consumer: it
publishes rgb8 frames (CamVid val when present, else synthetic) round-robin at ``--rate`` per camera,
stamped when sent, and subscribes to every output the node has (``--outputs``). Latency = receive time
of a camera's labels - the input's stamp, so it includes both DDS hops, waiting and inference. The
node's RSS comes from /proc/<pid>/status every second; its counters (frames in/out, drops, errors) from
/diagnostics once the load has stopped. When the node cannot keep up it must drop stale frames (the
keep-latest slot) so that latency and memory stay bounded: that is what this measures.

``--json FILE`` writes the figures for programs (test/test_load.py runs a short version).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as stages  # noqa: E402  (benchmarks/pipeline.py: default model, CamVid folder)

from unet_perception.launch_support import apply_node_env, node_command, node_env  # noqa: E402
from unet_perception.tools.camera_sim import image_message, load_frames, synthetic_frame  # noqa: E402
from unet_perception.topics import OUTPUTS, output_topics  # noqa: E402

CONNECT_TIMEOUT_S = 60.0  # node start-up (model load, warm-up) on a busy machine
SETTLE_TIMEOUT_S = 15.0   # after the load stops: the node's last frames and a fresh /diagnostics
FRAMES_PER_CAMERA = 8
CDR_HEADER_BYTES = 4  # the encapsulation header of a serialised message, then its fields in order
STAMP = struct.Struct("<iI")  # builtin_interfaces/Time: int32 sec, uint32 nanosec (little-endian CDR)


@dataclass
class LoadConfig:
    duration: float = 600.0
    cameras: int = 4
    rate: float = 30.0
    size: tuple[int, int] = (640, 480)  # width, height
    backend: str = "auto"
    max_batch: int = 0  # the node's default: auto (1 on the CPU)
    threads: int = 0
    outputs: tuple[str, ...] = OUTPUTS


@dataclass
class CameraResult:
    """One camera: what was sent, what the node counted, what came back and how late."""

    topic: str
    sent: int = 0
    frames_in: int = 0
    frames_out: int = 0
    drops: int = 0
    errors: int = 0
    received: int = 0  # labels messages received here
    rate_out_hz: float = 0.0
    latency_p50_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    latency_max_ms: float = float("nan")


@dataclass
class LoadResult:
    config: dict[str, Any]
    model: str
    backend: str
    device: str
    cameras: list[CameraResult]
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since the load started, MiB)

    def rss_at(self, fraction: float) -> float:
        """RSS at ``fraction`` of the run (0 = when the load started, 1 = when it stopped)."""
        if not self.rss_mb:
            return float("nan")
        t_end = self.config["duration"]
        return min(self.rss_mb, key=lambda s: abs(s[0] - fraction * t_end))[1]


def vm_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB (``VmRSS`` of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status (a zombie process?)")


class Probe:
    """This process's side: camera publishers, output subscribers (labels timed), /diagnostics."""

    def __init__(self, context: rclpy.Context, config: LoadConfig, frames: list[np.ndarray]) -> None:
        self.node = rclpy.create_node("load_probe", context=context)
        self.topics = [f"/load{k}/image_raw" for k in range(config.cameras)]
        self.publishers = [self.node.create_publisher(Image, t, qos_profile_sensor_data) for t in self.topics]
        self.messages = [[image_message(f, "rgb8", frame_id=f"load{k}_optical") for f in frames]
                         for k in range(config.cameras)]
        self.sent = [0] * config.cameras
        self.latencies: list[list[float]] = [[] for _ in self.topics]
        self.subscriptions = []
        for k, topic in enumerate(self.topics):
            for kind, name in output_topics(topic).items():
                if kind in config.outputs:  # raw: not deserialised, to spare this process's CPU
                    callback = partial(self._on_labels, k) if kind == "labels" else self._ignore
                    self.subscriptions.append(self.node.create_subscription(
                        Image, name, callback, qos_profile_sensor_data, raw=True))
        self.diagnostics: dict[str, dict[str, str]] = {}
        self.diagnostics_received = 0
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)

    @staticmethod
    def _ignore(data: bytes) -> None:
        """Color and overlay are received (the node computes only what is subscribed) but not examined."""

    def _on_labels(self, k: int, data: bytes) -> None:
        now = time.time_ns()
        sec, nanosec = STAMP.unpack_from(data, CDR_HEADER_BYTES)  # header.stamp leads the serialised Image
        self.latencies[k].append((now - sec * 1_000_000_000 - nanosec) / 1e6)

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            self.diagnostics[status.hardware_id] = {kv.key: kv.value for kv in status.values}
        self.diagnostics_received += 1

    def connected(self) -> bool:
        return (all(p.get_subscription_count() for p in self.publishers)
                and all(s.get_publisher_count() for s in self.subscriptions))

    def publish(self, k: int) -> None:
        """Send camera ``k``'s next frame, stamped now."""
        msg = self.messages[k][self.sent[k] % len(self.messages[k])]
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self.publishers[k].publish(msg)
        self.sent[k] += 1

    def counters(self, k: int) -> dict[str, str] | None:
        """The node's latest /diagnostics values of camera ``k`` (None before the first message)."""
        return next((v for topic, v in self.diagnostics.items() if topic.endswith(self.topics[k])), None)

    def settled(self) -> bool:
        """Every camera's frames are accounted for: in = out + drops + errors (nothing still in a slot)."""
        for k in range(len(self.topics)):
            v = self.counters(k)
            if v is None or int(v["frames_in"]) != int(v["frames_out"]) + int(v["drops"]) + int(v["errors"]):
                return False
        return True


def publish_load(probe: Probe, config: LoadConfig, pid: int, rss: list[tuple[float, float]]) -> None:
    """Publish round-robin (camera phases evenly staggered) for ``config.duration``; sample RSS each second."""
    period = 1.0 / (config.rate * config.cameras)
    start = time.monotonic()
    ticks, next_rss = 0, start
    while (now := time.monotonic()) < start + config.duration:
        if now >= next_rss:
            rss.append((now - start, vm_rss_mb(pid)))
            next_rss += 1.0
        probe.publish(ticks % config.cameras)
        ticks += 1
        delay = start + ticks * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    rss.append((time.monotonic() - start, vm_rss_mb(pid)))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; node log:\n"
                               f"{log.read_text()[-3000:]}")
        time.sleep(0.05)


@contextmanager
def node_beside(probe: Probe, params: dict[str, Any], log: Path) -> Iterator[subprocess.Popen]:
    """Spin ``probe`` (made in its own, initialised context) in a thread, start the node as a process with
    ``params`` (its output in ``log``) and wait until their topics connect; afterwards Ctrl-C the node (kill it
    after 15 s), stop the spinner, destroy the probe and shut its context down."""
    context = probe.node.context
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(probe.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    with log.open("w") as out:
        node = subprocess.Popen(node_command(None, params), env=os.environ | node_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: probe.connected() or node.poll() is not None, CONNECT_TIMEOUT_S, "the node's topics", log)
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with {node.returncode}:\n{log.read_text()[-3000:]}")
        yield node
    finally:
        node.send_signal(2)  # Ctrl-C
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()
        executor.shutdown()
        spinner.join(timeout=5)  # before the node goes: a spin still in flight would touch destroyed handles
        probe.node.destroy_node()
        rclpy.try_shutdown(context=context)


def run_load(config: LoadConfig, model: Path, workdir: Path, model_label: str = "") -> LoadResult:
    """Start the node, load it for ``config.duration`` s, stop it; the figures (``model_label`` names the model)."""
    width, height = config.size
    if stages.CAMVID_VAL.is_dir():
        frames = load_frames(stages.CAMVID_VAL, width, height, limit=FRAMES_PER_CAMERA)
    else:
        frames = [synthetic_frame(width, height, i) for i in range(FRAMES_PER_CAMERA)]
    context = rclpy.Context()
    rclpy.init(context=context)
    probe = Probe(context, config, frames)
    log = workdir / "node.log"
    params = {"model_path": str(model), "image_topics": probe.topics, "backend": config.backend,
              "max_batch": config.max_batch, "threads": config.threads}
    result = LoadResult(config=asdict(config) | {"model": str(model)}, model=model_label or str(model),
                        backend="", device="", cameras=[CameraResult(t) for t in probe.topics])
    with node_beside(probe, params, log) as node:
        publish_load(probe, config, node.pid, result.rss_mb)
        seen = probe.diagnostics_received  # counters from after the load, not a lucky moment during it
        wait_for(lambda: probe.diagnostics_received >= seen + 2 and probe.settled(), SETTLE_TIMEOUT_S,
                 "the node's counters to settle after the load", log)
    for k, cam in enumerate(result.cameras):
        v = probe.counters(k) or {}
        cam.sent = probe.sent[k]
        cam.frames_in, cam.frames_out = int(v["frames_in"]), int(v["frames_out"])
        cam.drops, cam.errors = int(v["drops"]), int(v["errors"])
        result.backend, result.device = v["backend"], v["device"]
        lat = np.asarray(probe.latencies[k])
        cam.received = int(lat.size)
        cam.rate_out_hz = lat.size / config.duration
        if lat.size:
            cam.latency_p50_ms, cam.latency_p99_ms = (float(x) for x in np.percentile(lat, [50, 99]))
            cam.latency_max_ms = float(lat.max())
    return result


def format_table(result: LoadResult) -> str:
    c = result.config
    lines = [
        f"load: {c['cameras']} cameras x {c['rate']:g} Hz, {c['size'][0]}x{c['size'][1]} rgb8, {c['duration']:g} s; "
        f"outputs {', '.join(c['outputs'])}; model {result.model}; {result.backend} on {result.device}, "
        f"max_batch {c['max_batch']}, threads {c['threads'] or 'default'}; {platform.machine()}, "
        f"{os.cpu_count()} cores",
        "",
        "| camera | sent | node in | node out | drops | errors | received | rate out Hz | latency p50 ms "
        "| p99 ms | max ms |",
        "|--------|-----:|--------:|---------:|------:|-------:|---------:|------------:|---------------:"
        "|-------:|-------:|",
    ]
    for cam in result.cameras:
        lines.append(f"| {cam.topic} | {cam.sent} | {cam.frames_in} | {cam.frames_out} | {cam.drops} | {cam.errors} "
                     f"| {cam.received} | {cam.rate_out_hz:.1f} | {cam.latency_p50_ms:.0f} | {cam.latency_p99_ms:.0f} "
                     f"| {cam.latency_max_ms:.0f} |")
    start, q1, mid, end = (result.rss_at(f) for f in (0.0, 0.1, 0.5, 1.0))
    peak = max((s[1] for s in result.rss_mb), default=float("nan"))
    lines += ["", f"node RSS MiB: start {start:.0f}, 10% {q1:.0f}, mid {mid:.0f}, end {end:.0f}, max {peak:.0f} "
                  f"(second half {end - mid:+.1f})"]
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT like 640x480, got '{text}'") from None
    return width, height


def _outputs(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if "labels" not in kinds or not set(kinds) <= set(OUTPUTS):
        raise argparse.ArgumentTypeError(f"outputs must include labels and be among {', '.join(OUTPUTS)}, "
                                         f"got '{text}'")
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: 600)")
    p.add_argument("--cameras", type=int, default=4, help="number of cameras (default: 4)")
    p.add_argument("--rate", type=float, default=30.0, help="frames per second per camera (default: 30)")
    p.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT (default: 640x480)")
    p.add_argument("--model", type=Path, default=None,
                   help=f"ONNX model (default: {stages.SHIPPED_MODEL} if present, else the seed-size U-Net "
                        "with random weights)")
    p.add_argument("--backend", default="auto", help="node parameter backend (default: auto)")
    p.add_argument("--max-batch", type=int, default=0, help="node parameter max_batch (default: 0 = auto, as the "
                   "node's default)")
    p.add_argument("--threads", type=int, default=0, help="node parameter threads (default: 0, the library's)")
    p.add_argument("--outputs", type=_outputs, default=OUTPUTS,
                   help="outputs subscribed to, the node computes only these (default: labels,color,overlay)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.cameras < 1 or args.rate <= 0:
        p.error("--duration, --cameras and --rate must be positive")
    config = LoadConfig(args.duration, args.cameras, args.rate, args.size, args.backend,
                        args.max_batch, args.threads, args.outputs)
    apply_node_env()  # this process publishes camera-sized frames too: the large-frame profile, before rclpy
    with tempfile.TemporaryDirectory() as tmp:
        model, label = stages.model_or_default(args.model, Path(tmp))
        result = run_load(config, model, Path(tmp), label)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
