"""unet-bag: real rosbag2 files (sqlite3 and mcap) written, labelled and played over a real rclpy graph."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from conftest import bag_messages
from ros_graph import TIMEOUT_S, RosGraph

from unet_perception.backends.cuda_memory import gpu_visible
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.codec import decode_compressed
from unet_perception.pipeline import Segmenter, colorize
from unet_perception.tools import bag
from unet_perception.tools.bag import IMAGE, bag_from_images, label_bag, typestore
from unet_perception.tools.bag_cli import main
from unet_perception.tools.bag_play import play_bag

START = 1_700_000_000_000_000_000


def _frames(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """PNG frames with distinct content (a gradient plus an index-dependent block)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(folder / f"frame_{i:03d}.png")
        cv2.imwrite(str(paths[-1]), img)
    return paths


def _read(path: Path) -> dict[str, list[tuple[int, object]]]:
    """topic -> [(bag timestamp, deserialized message)] in bag order."""
    store = typestore()
    out: dict[str, list[tuple[int, object]]] = {}
    with Reader(path) as reader:
        for conn, ts, raw in reader.messages():
            out.setdefault(conn.topic, []).append((ts, store.deserialize_cdr(raw, conn.msgtype)))
    return out


def _types(path: Path) -> dict[str, str]:
    with Reader(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def _pixels(msg: object) -> np.ndarray:
    channels = {"mono8": 1, "rgb8": 3, "bgr8": 3}[msg.encoding]  # type: ignore[attr-defined]
    shape = (msg.height, msg.width, channels)  # type: ignore[attr-defined]
    return msg.data.reshape(shape).squeeze(-1) if channels == 1 else msg.data.reshape(shape)  # type: ignore


@pytest.fixture
def segmenter(tiny_model: Path):
    backend = create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=2))
    with backend:
        yield Segmenter(backend, backend.info.classes)


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_from_images_raw(tmp_path: Path, storage: str) -> None:
    images = _frames(tmp_path / "img", [(24, 32), (24, 32), (30, 40)])
    out = tmp_path / "bag"
    stamps = bag_from_images(images, out, topic="/cam/image_raw", rate=4.0, frame_id="cam_optical",
                             storage=storage, start_ns=START, progress=False)
    assert stamps == [START, START + 250_000_000, START + 500_000_000]
    assert _types(out) == {"/cam/image_raw": IMAGE}
    msgs = _read(out)["/cam/image_raw"]
    for (ts, msg), path, stamp in zip(msgs, images, stamps, strict=True):
        assert ts == stamp == msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert msg.header.frame_id == "cam_optical" and msg.encoding == "rgb8"
        np.testing.assert_array_equal(_pixels(msg), cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    assert (out / f"bag.{'db3' if storage == 'sqlite3' else 'mcap'}").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bag.partial")]


def test_from_images_compressed_cli(tmp_path: Path) -> None:
    images = _frames(tmp_path / "img", [(24, 32)] * 2)
    out = tmp_path / "bag"
    assert main(["from-images", str(tmp_path / "img"), str(out), "--compressed", "--format", "png",
                 "--storage", "mcap", "--encoding", "bgr8", "--limit", "1"]) == 0
    msgs = _read(out)["/camera/image_raw/compressed"]
    assert len(msgs) == 1
    msg = msgs[0][1]
    assert msg.format == "bgr8; png compressed bgr8"
    np.testing.assert_array_equal(decode_compressed(msg), cv2.cvtColor(cv2.imread(str(images[0])),
                                                                       cv2.COLOR_BGR2RGB))


def _mixed_bag(path: Path, storage: StoragePlugin, frames: list[np.ndarray]) -> None:
    """Two cameras (raw bgr8 and compressed PNG) plus a std_msgs/String topic."""
    store = typestore()
    T = store.types
    with Writer(path, version=8, storage_plugin=storage) as w:
        raw = w.add_connection("/front/image_raw", IMAGE, typestore=store)
        comp = w.add_connection("/rear/image_raw/compressed", bag.COMPRESSED, typestore=store)
        note = w.add_connection("/note", "std_msgs/msg/String", typestore=store)
        for i, rgb in enumerate(frames):
            ts = START + i * 100_000_000  # the camera's stamp (capture) precedes the bag timestamp (record)
            header = T["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, ts - 7_654_321 - i), frame_id=f"f{i}")
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            w.write(raw, ts, store.serialize_cdr(bag.image_message(store, bgr, "bgr8", header), IMAGE))
            png = cv2.imencode(".png", bgr)[1].reshape(-1)
            w.write(comp, ts + 1, store.serialize_cdr(
                T[bag.COMPRESSED](header=header, format="png", data=png), bag.COMPRESSED))
            w.write(note, ts + 2, store.serialize_cdr(T["std_msgs/msg/String"](data=f"n{i}"), "std_msgs/msg/String"))



@pytest.mark.parametrize("storage", [StoragePlugin.SQLITE3, StoragePlugin.MCAP], ids=["sqlite3", "mcap"])
def test_label_adds_outputs_and_keeps_originals(tmp_path: Path, segmenter: Segmenter,
                                                storage: StoragePlugin) -> None:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (36, 52, 3), dtype=np.uint8) for _ in range(5)]
    src, out = tmp_path / "in", tmp_path / "out"
    _mixed_bag(src, storage, frames)
    summary = label_bag(src, out, segmenter, batch=3, alpha=0.5, progress=False)
    assert summary.frames == {"/front/image_raw": 5, "/rear/image_raw/compressed": 5}
    assert summary.errors == [] and summary.copied == 15

    types = _types(out)
    for ns in ("/front", "/rear"):
        for kind in ("labels", "color", "overlay"):
            assert types[f"{ns}/segmentation/{kind}"] == IMAGE
    got, original = _read(out), _read(src)
    raw_in, raw_out = bag_messages(src), bag_messages(out)
    for topic in raw_in:  # originals byte for byte, at their timestamps
        assert raw_out[topic] == raw_in[topic]
    assert [m.data for _, m in got["/note"]] == [f"n{i}" for i in range(5)]

    expected = [s.labels for s in segmenter.run(frames)]
    palette = segmenter.classes.palette()
    for ns, cam, offset in (("/front", "/front/image_raw", 0), ("/rear", "/rear/image_raw/compressed", 1)):
        labels = got[f"{ns}/segmentation/labels"]
        assert [ts for ts, _ in labels] == [ts for ts, _ in original[cam]]
        assert [START + i * 100_000_000 + offset for i in range(5)] == [ts for ts, _ in labels]
        stamps_in = [(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in original[cam]]
        for kind in ("labels", "color", "overlay"):  # each output carries its camera message's stamp
            assert [(m.header.stamp.sec, m.header.stamp.nanosec) for _, m in got[f"{ns}/segmentation/{kind}"]] \
                == stamps_in
        for i, (_, msg) in enumerate(labels):
            assert msg.encoding == "mono8" and msg.header.frame_id == f"f{i}"
            np.testing.assert_array_equal(_pixels(msg), expected[i])
            color = got[f"{ns}/segmentation/color"][i][1]
            assert color.encoding == "rgb8"
            np.testing.assert_array_equal(_pixels(color), colorize(expected[i], palette))
        overlay_enc = {m.encoding for _, m in got[f"{ns}/segmentation/overlay"]}
        # a bgr8 camera gets a bgr8 overlay; a bare "png" CompressedImage names no family -> rgb8
        assert overlay_enc == ({"bgr8"} if ns == "/front" else {"rgb8"})
    front_overlay = _pixels(got["/front/segmentation/overlay"][0][1])[:, :, ::-1]
    np.testing.assert_array_equal(front_overlay, segmenter.outputs(frames[0], expected[0]).overlay)


def test_label_cli_reports_and_skips_a_corrupt_message(tmp_path: Path, tiny_model: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    store = typestore()
    src, out = tmp_path / "in", tmp_path / "out"
    good = np.zeros((20, 30, 3), np.uint8)
    with Writer(src, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
        conn = w.add_connection("/camera/image_raw", IMAGE, typestore=store)
        for i in range(4):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i), frame_id="c")
            msg = bag.image_message(store, good, "rgb8", header)
            if i == 2:  # data shorter than height * step
                msg.data = msg.data[:100]
            w.write(conn, START + i, store.serialize_cdr(msg, IMAGE))
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"]) == 0
    report = capsys.readouterr()
    assert "1 errors" in report.out and "3 frames labelled" in report.out
    assert "skipped /camera/image_raw" in report.out + report.err
    got = _read(out)
    assert len(got["/camera/image_raw"]) == 4
    assert [ts for ts, _ in got["/camera/segmentation/labels"]] == [START, START + 1, START + 3]


def test_label_cli_device(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--backend tensorrt` on the default device cpu is one line naming the flag that fixes it (before: "set device
    to cuda", the node's parameter, which `unet-bag label` had no option for); `--device cpu` labels."""
    src = tmp_path / "in"
    bag_from_images(_frames(tmp_path / "img", [(24, 32)] * 2), src, start_ns=START, progress=False)
    model = ["--model", str(tiny_model)]
    assert main(["label", str(src), str(tmp_path / "trt"), *model, "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--backend tensorrt runs on CUDA only" in err and "add --device cuda" in err, err
    assert not (tmp_path / "trt").exists()
    assert main(["label", str(src), str(tmp_path / "cpu"), *model, "--backend", "onnxruntime", "--device", "cpu"]) == 0
    assert "(backend onnxruntime, cpu)" in capsys.readouterr().out
    assert len(_read(tmp_path / "cpu")["/camera/segmentation/labels"]) == 2


@pytest.mark.skipif(gpu_visible(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_label_cli_on_cuda_without_a_gpu_advises_its_own_flag(tmp_path: Path, tiny_model: Path, backend: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--device cuda` where nothing runs on CUDA: the backends' advice ("set device cpu", the node's parameter) is
    said in this tool's terms."""
    src = tmp_path / "in"
    bag_from_images(_frames(tmp_path / "img", [(24, 32)]), src, start_ns=START, progress=False)
    argv = ["label", str(src), str(tmp_path / "out"), "--model", str(tiny_model), "--backend", backend]
    assert main([*argv, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pass --device cpu" in err and "set device" not in err, err


def test_label_many_tensorrt_without_gpu_workers_names_the_flag(tmp_path: Path, tiny_model: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """label-many's workers are on cuda only with a GPU share: the error says --gpus-per-worker, before Ray starts."""
    src = tmp_path / "in"
    bag_from_images(_frames(tmp_path / "img", [(24, 32)]), src, start_ns=START, progress=False)
    argv = ["label-many", str(src), "--out", str(tmp_path / "out"), "--model", str(tiny_model), "--backend", "tensorrt"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "add --gpus-per-worker 1" in err, err
    assert not (tmp_path / "out").exists()


def test_play_publishes_recorded_messages_and_clock(tmp_path: Path) -> None:
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    images = _frames(tmp_path / "img", [(24, 32)] * 4)
    src = tmp_path / "bag"
    stamps = bag_from_images(images, src, topic="/play_test/image_raw", rate=20.0, start_ns=START, progress=False)
    rclpy.init()
    node = rclpy.create_node("test_bag_player")
    got: list[Image] = []
    clock: list[int] = []
    published: list[int] = []
    node.create_subscription(Image, "/play_test/image_raw", got.append, qos_profile_sensor_data)
    node.create_subscription(Clock, "/clock", lambda m: clock.append(m.clock.sec * 10**9 + m.clock.nanosec), 10)
    node.create_subscription(String, "/unused", lambda m: None, 10)
    executor = rclpy.executors.SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        stats = play_bag(node, src, rate_factor=2.0, clock=True, wait_for_subscribers=10.0, progress=False,
                             on_publish=lambda topic, ts: published.append(ts))
        deadline = time.monotonic() + 20.0  # generous: a loaded 2-core machine
        while len(got) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    assert stats.published == {"/play_test/image_raw": 4} and published == stamps
    assert [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in got] == stamps
    first = np.frombuffer(got[0].data, np.uint8).reshape(24, 32, 3)
    np.testing.assert_array_equal(first, cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB))
    assert clock and clock == sorted(clock) and START <= clock[0] and clock[-1] == stamps[-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT-ignored-at-start"])
def test_play_stopped_by_a_signal_ends_cleanly(tmp_path: Path, signum: int) -> None:
    """`unet-bag play` as a user starts it (the console script, the ROS wheels' bootstrap included), stopped while it
    publishes: one line, no traceback, 128 + the signal. SIGINT comes to a process that started with it ignored, as
    a script's background job does. Before, rclpy's handler shut the context down under a publish: exit 1 and
    "RCLError: Failed to publish: publisher's context is invalid"."""
    from sensor_msgs.msg import Image

    src = tmp_path / "bag"
    bag_from_images(_frames(tmp_path / "img", [(24, 32)] * 4), src, topic="/play_signal/image_raw", rate=20.0,
                    start_ns=START, progress=False)
    play = shlex.join([str(Path(sys.executable).parent / "unet-bag"), "play", str(src), "--loop"])
    # the child bootstraps its own LD_LIBRARY_PATH, as from a shell, and keeps this session's ROS domain
    env = {k: v for k, v in os.environ.items() if k not in ("_ROS_WHEELS_BOOTSTRAP_COMPLETE", "LD_LIBRARY_PATH")}
    ignore = "trap '' INT; " if signum == signal.SIGINT else ""
    proc = subprocess.Popen(["bash", "-c", f"{ignore}exec {play}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with RosGraph() as graph:
            graph.collect(Image, "/play_signal/image_raw").wait_for(2)  # it is publishing
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "context is invalid" not in err, err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"unet-bag play: stopped by {signal.Signals(signum).name} after "), err


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for sub in ("from-images", "label", "play"):
        with pytest.raises(SystemExit) as exit_info:
            main([sub, "--help"])
        assert exit_info.value.code == 0
        assert f"unet-bag {sub}" in capsys.readouterr().out
