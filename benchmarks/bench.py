"""``make bench``: the node at fixed camera rates and at its own maximum, in the style of ros2_benchmark / r2b.

    python benchmarks/bench.py [--duration 8] [--rates 10,20,30,60,max] [--cameras 1,4] [--json FILE]
    python benchmarks/bench.py --levers            # one row per lever (1 camera at 60 Hz, 4 at 30 Hz), in turns
    python benchmarks/bench.py --soak 600          # RSS over 10 minutes at 4 cameras x 30 Hz, slope in MiB/min

The node runs in its own process as the launch file starts it (benchmarks/load.py); this process is the separate
publisher and consumer: 640x480 rgb8 frames (CamVid val when present, else synthetic) stamped when sent, the
labels output subscribed raw. ``max`` is a closed loop: each camera keeps two frames in flight (the node's pipeline
depth: one inferring, one prepared) and sends the next one when a label comes back, so the node is never starved
and never flooded. Per row: output fps per camera, latency p50/p99 (label arrival - input stamp, both DDS hops
included), the node's own mean latency (receipt to publish, from /diagnostics) with its two parts, the wait for a
worker and the inference, drops (keep-latest drops + frames lost before the node), node CPU% (of one core,
/proc/<pid>/stat) and peak RSS (VmHWM). Beside it, raw inference of the same model, timed in this process before
any node starts and again before each row with the node idle (one live ONNX Runtime session at a time: the
spinning pools of two would steal each other's cores). The goals of issue 16 are checked against those raw figures
and printed as PASS/MISS lines; they are goals, never tests.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (benchmarks/load.py: the probe, RSS, waiting)
import pipeline as stages  # noqa: E402  (benchmarks/pipeline.py: default model, CamVid folder)

from unet_perception.backends.factory import BackendOptions, create_backend  # noqa: E402
from unet_perception.launch_support import apply_node_env  # noqa: E402
from unet_perception.model_contract import read_model_info  # noqa: E402
from unet_perception.node_params import PARAMS  # noqa: E402
from unet_perception.tools.camera_sim import load_frames, synthetic_frame  # noqa: E402

WINDOW = 2                # max rate: frames in flight per camera
LOST_S = 3.0              # max rate: no label for this long means a frame was lost before the node
SETTLE_S = 0.5            # after a row: the last labels and the node's counters
CLK_TCK = os.sysconf("SC_CLK_TCK")
RAW_ROUNDS_PER_ROW = 15   # raw inference just before each row


@dataclass
class Row:
    cameras: int
    rate: str                       # "10", ..., "max"
    sent: int = 0
    fps: list[float] = field(default_factory=list)        # per camera
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    node_ms: float = float("nan")   # the node's own mean latency (receipt to publish, /diagnostics totals, this row)
    node_wait_ms: float = float("nan")       # of which: waiting in the slot for a worker
    node_inference_ms: float = float("nan")  # of which: the inference run
    drops: int = 0
    cpu_pct: float = 0.0
    publisher_cpu_pct: float = 0.0  # this process (publisher and probe), on the same cores as the node
    core_ms: float = float("nan")   # node CPU time per output frame (robust to a shared machine: no wall time)
    peak_rss_mib: float = 0.0
    settings: str = ""
    raw_ms: float = float("nan")    # raw inference timed just before the row (the machine's speed drifts)


def raw_options(params: dict[str, Any]) -> BackendOptions:
    """The inference settings of a node started with ``params`` (its defaults for the rest), at batch 1."""
    node = {spec.name: spec.default for spec in PARAMS} | params
    return BackendOptions(max_batch=1, threads=int(node["threads"]), spinning=bool(node["spinning"]),
                          spin_us=int(node["spin_us"]))


def describe(options: BackendOptions) -> str:
    """The settings as the session gets them (an onnxruntime older than 1.26 does not spin where bounded)."""
    import onnxruntime as ort

    from unet_perception.backends.onnxruntime import spin_entries

    entries = spin_entries(options.spinning, options.spin_us, ort.__version__)
    bound = entries.get("session.intra_op.spin_duration_us")
    spin = ("no spinning" if entries["session.intra_op.allow_spinning"] == "0"
            else f"spin {bound} us" if bound else "spin as long as ONNX Runtime does")
    return f"batch 1, threads {options.threads or 'default'}, {spin}"


def raw_inference(model: Path, options: BackendOptions, rounds: int = 40) -> tuple[float, float, float]:
    """(fps, median ms, CPU core-ms per frame) of ``backend.infer`` at batch 1, the backend the node uses."""
    info = read_model_info(model)
    backend = create_backend("onnxruntime", info, options)
    batch = np.random.default_rng(0).integers(0, 256, (1, *info.input_hw, 3), dtype=np.uint8)
    with backend:
        for _ in range(5):
            backend.infer(batch)
        times = []
        cpu = time.process_time()  # every thread of this process: ONNX Runtime's pool too
        for _ in range(rounds):
            start = time.perf_counter()
            backend.infer(batch)
            times.append(time.perf_counter() - start)
        core_ms = (time.process_time() - cpu) * 1e3 / rounds
    del backend
    gc.collect()  # the session and its thread pool go before any node runs
    ms = float(np.median(times)) * 1e3
    return 1000.0 / ms, ms, core_ms


def message_costs(rgb: np.ndarray, rounds: int = 30) -> dict[str, float]:
    """CPU ms (this thread, median) of the two message levers: rclpy's (de)serialisation against raw_cdr's."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    from unet_perception import raw_cdr
    from unet_perception.codec import encode_image

    header, labels = Header(frame_id="camera"), rgb[:, :, 0].copy()
    data = serialize_message(encode_image(rgb, "rgb8", header))
    raw_header = raw_cdr.RawHeader(raw_cdr.Stamp(0, 0), "camera")
    cases = {
        "in rgb8 rclpy deserialise": lambda: deserialize_message(data, Image),
        "in rgb8 raw_cdr.parse_image": lambda: raw_cdr.parse_image(data),
        "out rgb8 rclpy encode+serialise": lambda: serialize_message(encode_image(rgb, "rgb8", header)),
        "out rgb8 raw_cdr.image": lambda: raw_cdr.image(rgb, "rgb8", raw_header),
        "out mono8 rclpy encode+serialise": lambda: serialize_message(encode_image(labels, "mono8", header)),
        "out mono8 raw_cdr.image": lambda: raw_cdr.image(labels, "mono8", raw_header),
    }
    costs = {}
    for name, fn in cases.items():
        fn()
        times = []
        for _ in range(rounds):
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
        costs[name] = float(np.median(times)) * 1e3
    return costs


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


class Bench(load.Probe):
    """load.Probe plus the closed loop of the max rate: stamps in flight per camera, released by their labels."""

    def __init__(self, context: rclpy.Context, config: load.LoadConfig, frames: list[np.ndarray]) -> None:
        self.in_flight: list[list[int]] = [[] for _ in range(config.cameras)]
        self.cond = threading.Condition()
        self.row_start_ns = 0  # labels of frames stamped before the row (warm-up, the last row) do not count
        super().__init__(context, config, frames)

    def _on_labels(self, k: int, data: bytes) -> None:
        sec, nanosec = load.STAMP.unpack_from(data, load.CDR_HEADER_BYTES)
        done = sec * 1_000_000_000 + nanosec
        if done >= self.row_start_ns:
            super()._on_labels(k, data)
        with self.cond:  # frames older than this one were dropped by the node: no label will come for them
            self.in_flight[k] = [s for s in self.in_flight[k] if s > done]
            self.cond.notify_all()

    def send(self, k: int) -> None:
        msg = self.messages[k][self.sent[k] % len(self.messages[k])]
        self.publish(k)
        with self.cond:
            self.in_flight[k].append(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)


def play(bench: Bench, cameras: int, rate: str, duration: float) -> None:
    """Publish for ``duration`` s: round-robin at ``rate`` Hz per camera, or closed loop (``max``)."""
    end = time.monotonic() + duration
    if rate != "max":
        period, ticks, start = 1.0 / (float(rate) * cameras), 0, time.monotonic()
        while time.monotonic() < end:
            bench.send(ticks % cameras)
            ticks += 1
            delay = start + ticks * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        return
    for k in range(cameras):
        bench.in_flight[k].clear()
    while time.monotonic() < end:
        with bench.cond:
            bench.cond.wait_for(lambda: any(len(f) < WINDOW for f in bench.in_flight), timeout=LOST_S)
            ready = [k for k in range(cameras) if len(bench.in_flight[k]) < WINDOW]
            if not ready:  # no label for LOST_S: a frame lost before the node; its slot in the window expires
                for k in range(cameras):
                    bench.in_flight[k].pop(0)
        for k in ready:
            bench.send(k)


def run_row(bench: Bench, pid: int, cameras: int, rate: str, duration: float) -> Row:
    before = [dict(bench.counters(k) or {}) for k in range(cameras)]
    sent0 = list(bench.sent)
    for per_camera in bench.latencies:
        per_camera.clear()
    bench.row_start_ns = bench.node.get_clock().now().nanoseconds
    ticks0, own0, t0 = cpu_ticks(pid), time.process_time(), time.monotonic()
    play(bench, cameras, rate, duration)
    wall = time.monotonic() - t0
    cpu = 100.0 * (cpu_ticks(pid) - ticks0) / CLK_TCK / wall
    publisher_cpu = 100.0 * (time.process_time() - own0) / wall
    time.sleep(SETTLE_S)
    seen = bench.diagnostics_received
    load.wait_for(lambda: bench.diagnostics_received >= seen + 2 and bench.settled(), load.SETTLE_TIMEOUT_S,
                  "the node's counters to settle after the row", Path("/dev/null"))
    row = Row(cameras, rate, sent=sum(bench.sent) - sum(sent0), cpu_pct=cpu, publisher_cpu_pct=publisher_cpu,
              peak_rss_mib=peak_rss_mib(pid))
    lat = np.concatenate([np.asarray(x) for x in bench.latencies]) if any(bench.latencies) else np.array([])
    row.fps = [len(x) / wall for x in bench.latencies]
    out = sum(len(x) for x in bench.latencies)
    row.core_ms = cpu * 10.0 * wall / out if out else float("nan")  # cpu% * wall s * 10 = core-ms
    if lat.size:
        row.p50_ms, row.p99_ms = (float(v) for v in np.percentile(lat, [50, 99]))
    after = [bench.counters(k) or {} for k in range(cameras)]
    row.node_ms, row.node_wait_ms, row.node_inference_ms = (node_mean_ms(before, after, key)
                                                             for key in ("latency", "wait", "inference"))
    for k, now in enumerate(after):
        sent = bench.sent[k] - sent0[k]
        got_in = int(now["frames_in"]) - int(before[k].get("frames_in", 0))
        row.drops += int(now["drops"]) - int(before[k].get("drops", 0)) + max(sent - got_in, 0)
    return row


def node_mean_ms(before: list[dict[str, str]], after: list[dict[str, str]], part: str) -> float:
    """The node's own mean of ``part`` (latency, wait, inference) over the frames it published during the row, all
    cameras together: the difference of its diagnostics' running totals over the difference of ``frames_out``."""
    total = frames = 0.0
    for b, a in zip(before, after):
        key = f"{part}_total_ms"
        if key not in a or key not in b:  # a row without two diagnostics messages from the node
            return float("nan")
        total += float(a[key]) - float(b[key])
        frames += int(a["frames_out"]) - int(b["frames_out"])
    return total / frames if frames else float("nan")


def run_node(model: Path, cameras: int, rates: list[str], duration: float, frames: list[np.ndarray],
             params: dict[str, Any], workdir: Path) -> list[Row]:
    """One node process for ``cameras`` cameras; the rows of ``rates`` in order, each after a short warm-up."""
    config = load.LoadConfig(duration=duration, cameras=cameras, outputs=("labels",))
    context = rclpy.Context()
    rclpy.init(context=context)
    bench = Bench(context, config, frames)
    log = workdir / f"node_{cameras}.log"
    node_params = {"model_path": str(model), "image_topics": bench.topics} | params
    rows = []
    with load.node_beside(bench, node_params, log) as node:
        play(bench, cameras, "max", 1.5)  # warm-up: first frames, DDS buffers, the node's first allocations
        seen = bench.diagnostics_received  # counters from after the warm-up: the first row starts from them
        load.wait_for(lambda: bench.diagnostics_received >= seen + 2 and bench.settled(), load.SETTLE_TIMEOUT_S,
                      "the node's counters after the warm-up", log)
        for rate in rates:
            # Raw inference again just before the row, the node idle: on a shared VM the speed of the cores drifts
            # (66 to 92 ms per frame within half an hour here), and each row's goal is judged against its own.
            _, raw_ms, _ = raw_inference(model, raw_options(params), rounds=RAW_ROUNDS_PER_ROW)
            row = run_row(bench, node.pid, cameras, rate, duration)
            row.raw_ms = raw_ms
            row.settings = ", ".join(f"{k} {v}" for k, v in params.items()) or "defaults"
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(r: Row) -> str:
    fps = " / ".join(f"{f:.1f}" for f in r.fps)
    return (f"| {r.cameras} | {r.rate} | {r.settings} | {r.raw_ms:.0f} | {sum(r.fps):.1f} | {fps} | {r.p50_ms:.0f} "
            f"| {r.p99_ms:.0f} | {r.node_ms:.0f} ({r.node_wait_ms:.0f} / {r.node_inference_ms:.0f}) "
            f"| {r.drops} of {r.sent} | {r.cpu_pct:.0f} | {r.publisher_cpu_pct:.0f} | {r.core_ms:.0f} "
            f"| {r.peak_rss_mib:.0f} |")


HEADER = ("| cameras | rate Hz | node settings | raw ms before | output fps | per camera | latency p50 ms | p99 ms "
          "| in node ms (wait / inference) | drops | node CPU % | publisher CPU % | core-ms / frame out "
          "| peak RSS MiB |\n"
          "|--:|--:|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")


def goals(rows: list[Row], raw_fps: float, raw_ms: float) -> list[str]:
    """Issue 16's goals, each row against the raw inference timed just before it (``raw_ms`` of the row), or
    against this run's first figure where a row has none."""
    out = []
    by = {(r.cameras, r.rate): r for r in rows}

    def raw(r: Row) -> tuple[float, float]:  # (fps, ms)
        return (1000.0 / r.raw_ms, r.raw_ms) if r.raw_ms == r.raw_ms else (raw_fps, raw_ms)

    if (r := by.get((1, "60"))) is not None:
        fps, _ = raw(r)
        out.append(_goal(sum(r.fps) >= 0.8 * fps, f"1 camera at 60 Hz: {sum(r.fps):.1f} fps >= 0.8 x raw "
                                                    f"{fps:.1f} = {0.8 * fps:.1f}"))
    # The latency goal is set at 20 Hz, a rate the node keeps up with when raw inference is faster than 20 fps. It
    # is judged there as written; where 20 Hz is faster than 0.8 x raw fps (frames then wait behind each other),
    # an INFO line adds the same comparison at the fastest rate of the run the node keeps up with.
    if (r := by.get((1, "20"))) is not None:
        _, ms = raw(r)
        out.append(_goal(r.p50_ms <= ms + 6,
                         f"1 camera at 20 Hz: latency p50 {r.p50_ms:.0f} ms <= raw {ms:.0f} + 6 ms"))
    kept_up = sorted(float(rate) for c, rate in by if c == 1 and rate != "max" and float(rate) <= 0.8 * raw_fps)
    if kept_up and kept_up[-1] < 20.0 and (r := by.get((1, f"{kept_up[-1]:g}"))) is not None:
        _, ms = raw(r)
        out.append(f"INFO  1 camera at {kept_up[-1]:g} Hz: latency p50 {r.p50_ms:.0f} ms against raw {ms:.0f} + 6 ms "
                   f"(20 Hz is faster than 0.8 x raw {raw_fps:.1f} fps here; this is the fastest rate the node keeps "
                   "up with)")
    if (r := by.get((4, "30"))) is not None:
        fps, ms = raw(r)
        share = 0.85 * fps / 4
        out.append(_goal(min(r.fps) >= share, f"4 cameras at 30 Hz: every camera {min(r.fps):.1f} fps or more "
                                              f">= 0.85 x raw / 4 = {share:.1f}"))
        out.append(_goal(r.p99_ms <= 3 * ms, f"4 cameras at 30 Hz: p99 {r.p99_ms:.0f} ms <= 3 x raw {ms:.0f} ms"))
    return out


def _goal(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'MISS'}  {text}"


def soak(model: Path, seconds: float, frames: list[np.ndarray], params: dict[str, Any], workdir: Path) -> dict:
    """4 cameras x 30 Hz for ``seconds`` through load.py; RSS slope (MiB/min) after the first minute."""
    config = load.LoadConfig(duration=seconds, cameras=4, rate=30.0, max_batch=int(params.get("max_batch", 0)),
                             outputs=("labels",), threads=int(params.get("threads", 0)))
    result = load.run_load(config, model, workdir, str(model))
    samples = [(t, m) for t, m in result.rss_mb if t >= min(60.0, seconds / 2)]
    t, mib = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
    slope = float(np.polyfit(t / 60.0, mib, 1)[0]) if len(samples) > 2 else float("nan")
    return {"seconds": seconds, "rss_start": result.rss_at(0.0), "rss_end": result.rss_at(1.0),
            "rss_max": max(m for _, m in result.rss_mb), "slope_mib_per_min": slope,
            "fps_per_camera": [c.rate_out_hz for c in result.cameras]}


# One row per lever, each one setting away from the defaults: 1 camera at 60 Hz (the node's own cost per frame),
# then 4 cameras at 30 Hz (120 frames/s in, most of them dropped: the cost of receiving, the batch size).
LEVERS: list[tuple[int, str, dict[str, Any]]] = [
    (1, "defaults (cpu: frames in their own thread, stages in turn, spin 100 us, threads 0, max_batch auto = 1, "
        "workers auto = 1 per camera up to the cores)", {}),
    (1, "input_thread false (rclpy's executor takes the frames)", {"input_thread": False}),
    (1, "overlap always (three stage threads)", {"overlap": "always"}),
    (1, "spinning false (threads sleep at once)", {"spinning": False}),
    (1, "spin_us 0 (ONNX Runtime's own spin)", {"spin_us": 0}),
    (1, "threads 1", {"threads": 1}),
    (4, "defaults", {}),
    (4, "input_thread false", {"input_thread": False}),
    (4, "max_batch 4 (the default before auto)", {"max_batch": 4}),
    (4, "workers 1 (one frame at a time on every thread; the default before auto)", {"workers": 1}),
]
LEVER_RATE = {1: "60", 4: "30"}


def _param(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
    if isinstance(parsed, str) and parsed.lstrip("-").isdigit():
        parsed = int(parsed)
    return key, parsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per row (default: 8)")
    p.add_argument("--rates", default="10,20,30,60,max", help="camera rates in Hz, 'max' = closed loop")
    p.add_argument("--cameras", default="1,4", help="camera counts (default: 1,4)")
    p.add_argument("--model", type=Path, default=None, help=f"ONNX model (default: {stages.SHIPPED_MODEL})")
    p.add_argument("--images", type=Path, default=stages.CAMVID_VAL, help="folder of frames (default: CamVid val; "
                   "synthetic frames when it is missing)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="node parameter for every row, e.g. --param overlap=always (repeatable)")
    p.add_argument("--levers", action="store_true", help="one row per lever (1 camera at 60 Hz, 4 at 30 Hz), in turns")
    p.add_argument("--repeat", type=int, default=2, help="--levers: rounds of the lever rows (default: 2)")
    p.add_argument("--lever-cameras", default="1,4", help="--levers: the rows of these camera counts (default: 1,4)")
    p.add_argument("--soak", type=float, default=0.0, help="also run 4 x 30 Hz for this many seconds (RSS slope)")
    p.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    params = dict(args.param)
    apply_node_env()  # this process publishes camera-sized frames: the large-frame profile, before rclpy
    frames = (load_frames(args.images, 640, 480, limit=load.FRAMES_PER_CAMERA) if args.images.is_dir()
              else [synthetic_frame(640, 480, i) for i in range(load.FRAMES_PER_CAMERA)])
    source = f"CamVid ({args.images})" if args.images.is_dir() else "synthetic"
    started = time.monotonic()
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                              f"load average {os.getloadavg()[0]:.1f} at start", "frames": f"640x480 rgb8, {source}"}
    with tempfile.TemporaryDirectory() as tmp:
        model, label = stages.model_or_default(args.model, Path(tmp))
        options = raw_options(params)
        raw_fps, raw_ms, raw_core_ms = raw_inference(model, options)
        report |= {"model": label, "raw_fps": raw_fps, "raw_ms": raw_ms, "raw_core_ms": raw_core_ms,
                   "message_costs": message_costs(frames[0])}
        print(f"model {label}; frames {report['frames']}; {report['machine']}")
        print(f"raw inference ({describe(options)}): "
              f"{raw_fps:.1f} fps, {raw_ms:.1f} ms, {raw_core_ms:.1f} core-ms per frame")
        print("message costs per 640x480 frame, CPU ms (median): "
              + "; ".join(f"{k} {v:.3f}" for k, v in report["message_costs"].items()))
        print(f"\n{HEADER}", flush=True)
        rows: list[Row] = []
        if args.levers:
            for _ in range(args.repeat):
                for cameras, _name, lever in LEVERS:
                    if str(cameras) not in args.lever_cameras.split(","):
                        continue
                    rows += run_node(model, cameras, [LEVER_RATE[cameras]], args.duration, frames, params | lever,
                                     Path(tmp))
        else:
            for cameras in (int(c) for c in args.cameras.split(",")):
                rows += run_node(model, cameras, args.rates.split(","), args.duration, frames, params, Path(tmp))
        report["rows"] = [asdict(r) for r in rows]
        lines = goals(rows, raw_fps, raw_ms) if not args.levers else []
        if args.soak:
            report["soak"] = s = soak(model, args.soak, frames, params, Path(tmp))
            lines.append(_goal(s["slope_mib_per_min"] < 1.0, f"RSS at 4 x 30 Hz over {args.soak:.0f} s: slope "
                                                             f"{s['slope_mib_per_min']:+.2f} MiB/min < 1"))
    report["goals"] = lines
    report["seconds"] = time.monotonic() - started
    report["load_average_end"] = os.getloadavg()[0]
    print("\n" + "\n".join(lines) if lines else "", f"\n{report['seconds']:.0f} s; load average at the end "
          f"{report['load_average_end']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
