"""unet-bag against the attacks of issue 15 on one bag: a header that lies about its size, topic names ROS 2
refuses, one topic with two types, a camera none of whose frames can be labelled, Bayer frames too small to
demosaic, a damaged MCAP summary that makes a read short, and a killed run's staging folder.

Each test was seen failing with its bug planted (see the commit messages).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import REPO, bag_messages
from rosbags.rosbag2 import StoragePlugin, Writer

from unet_perception import codec
from unet_perception.tools import bag
from unet_perception.tools.bag import COMPRESSED, IMAGE, BagError, label_bag, typestore
from unet_perception.tools.bag_cli import main

START = 1_700_000_000_000_000_000
STRING, INT32 = "std_msgs/msg/String", "std_msgs/msg/Int32"


def _image(store: object, i: int, frame: np.ndarray, encoding: str = "rgb8") -> bytes:
    header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i), frame_id="c")  # type: ignore
    return store.serialize_cdr(bag.image_message(store, frame, encoding, header), IMAGE)  # type: ignore


def _cameras(path: Path, topics: dict[str, str], n: int, storage: StoragePlugin = StoragePlugin.SQLITE3) -> Path:
    """``n`` 24x32 frames on each topic, with the encoding given per topic (``{topic: encoding}``)."""
    store = typestore()
    frame = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with Writer(path, version=8, storage_plugin=storage) as w:
        conns = {t: w.add_connection(t, IMAGE, typestore=store) for t in topics}
        for i in range(n):
            for topic, conn in conns.items():
                w.write(conn, START + i, _image(store, i, frame, topics[topic]))
    return path


def _label(src: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["label", str(src), str(out), "--model", str(model), "--backend", "onnxruntime", *extra])


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


class NoWork:
    """A segmenter that fails the test if a frame reaches it: what is refused must be refused before the work."""

    backend = None

    def run(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        raise AssertionError("the work started")


# ---------------------------------------------------------------------------------------------- estimates


@pytest.mark.parametrize("liar", ["raw", "png"])
def test_a_lying_header_refuses_no_bag(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str], liar: str) -> None:
    """200 frames of 32x24; the first claims 4096x4096 with a few bytes (on main: refused, "needs about 10 GB")."""
    store = typestore()
    src = tmp_path / "in"
    frame = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START), frame_id="c")
    if liar == "raw":
        topic, msgtype = "/cam/image_raw", IMAGE
        lie = store.types[IMAGE](header=header, height=4096, width=4096, encoding="rgb8", is_bigendian=0,
                                 step=4096 * 3, data=np.zeros(3, np.uint8))
    else:
        topic, msgtype = "/cam/image_raw/compressed", COMPRESSED
        ihdr = b"IHDR" + struct.pack(">IIBBBBB", 4096, 4096, 8, 2, 0, 0, 0)
        png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
               + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))  # no pixel data at all
        lie = store.types[COMPRESSED](header=header, format="png", data=np.frombuffer(png, np.uint8))
    with Writer(src, version=8) as w:
        conn = w.add_connection(topic, msgtype, typestore=store)
        w.write(conn, START, store.serialize_cdr(lie, msgtype))
        for i in range(1, 200):
            if liar == "raw":
                w.write(conn, START + i, _image(store, i, frame))
            else:
                good = cv2.imencode(".png", frame)[1].reshape(-1)
                w.write(conn, START + i, store.serialize_cdr(store.types[COMPRESSED](
                    header=header, format="png", data=good), COMPRESSED))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**28, 2**28))  # 256 MiB free
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "199 frames labelled" in report and "1 errors" in report


# ---------------------------------------------------------------------------------------------- names and types


@pytest.mark.parametrize("bad", ["/a/../b/image_raw", "/c d/image_raw"])
def test_invalid_camera_names_are_refused_before_the_work(tmp_path: Path, tiny_model: Path,
                                                          capsys: pytest.CaptureFixture[str], bad: str) -> None:
    src = _cameras(tmp_path / "in", {bad: "rgb8", "/good/image_raw": "rgb8"}, 2)
    with pytest.raises(BagError, match=f"camera topic '{bad}' is not a valid ROS 2 topic name"):
        label_bag(src, tmp_path / "out", NoWork(), progress=False)
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 1
    line = _error_line(capsys.readouterr().err)
    assert "must not contain characters other than alphanumerics" in line
    assert f"--exclude-topics {shlex.quote(bad)}" in line
    assert not out.exists()
    assert _label(src, out, tiny_model, "--exclude-topics", bad) == 0  # the advice works
    assert set(bag_messages(out)) == {"/good/image_raw", *(f"/good/segmentation/{k}" for k in
                                                           ("labels", "color", "overlay", "confidence"))}

    assert main(["play", str(src), "--rate-factor", "100"]) == 1  # play: one line, not a traceback
    line = _error_line(capsys.readouterr().err)
    assert f"cannot publish topic '{bad}'" in line and "--topics" in line
    assert main(["play", str(src), "--rate-factor", "100", "--topics", "/good/image_raw"]) == 0


def test_play_refuses_a_topic_recorded_with_two_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = typestore()
    src = tmp_path / "in"
    with Writer(src, version=8) as w:
        text = w.add_connection("/x", STRING, typestore=store)
        number = w.add_connection("/x", INT32, typestore=store)
        other = w.add_connection("/y", STRING, typestore=store)
        for i in range(2):
            w.write(text, START + 3 * i, store.serialize_cdr(store.types[STRING](data="a"), STRING))
            w.write(number, START + 3 * i + 1, store.serialize_cdr(store.types[INT32](data=7), INT32))
            w.write(other, START + 3 * i + 2, store.serialize_cdr(store.types[STRING](data="b"), STRING))
    assert main(["play", str(src), "--rate-factor", "100"]) == 1
    report = capsys.readouterr()
    line = _error_line(report.err)
    assert "topic /x was recorded with 2 types (std_msgs/msg/String, std_msgs/msg/Int32)" in line
    assert "published" not in report.out
    assert main(["play", str(src), "--rate-factor", "100", "--topics", "/y"]) == 0
    assert "published 2 messages on 1 topics" in capsys.readouterr().out
    for factor in ("nan", "0", "-1"):  # nan passed the "> 0" check as "<= 0" is False, then time.sleep(nan)
        assert main(["play", str(src), "--rate-factor", factor, "--topics", "/y"]) == 1
        assert "--rate-factor must be > 0" in _error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- exits


def test_label_fails_when_a_camera_gets_no_frame_labelled(tmp_path: Path, tiny_model: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = _cameras(tmp_path / "in", {"/a/image_raw": "rgb8", "/b/image_raw": "rgb8"}, 3)
    import sqlite3  # every /b frame re-tagged with an encoding nobody decodes, as a misconfigured driver sends

    store = typestore()
    with sqlite3.connect(src / "in.db3") as db:
        rows = db.execute("SELECT messages.id, data FROM messages JOIN topics ON topics.id = topic_id "
                          "WHERE name = '/b/image_raw'").fetchall()
        for row_id, data in rows:
            msg = store.deserialize_cdr(data, IMAGE)
            msg.encoding = "foo8"
            db.execute("UPDATE messages SET data = ? WHERE id = ?", (store.serialize_cdr(msg, IMAGE), row_id))
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 1
    line = _error_line(capsys.readouterr().err)
    assert "no frame of /b/image_raw could be labelled: all 3 were refused" in line
    assert "encoding 'foo8' is not supported" in line and "--exclude-topics /b/image_raw" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in"]
    assert _label(src, out, tiny_model, "--exclude-topics", "/b/image_raw") == 0


def test_bayer_frames_too_small_to_demosaic_are_bad_input() -> None:
    from sensor_msgs.msg import Image

    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (2, 2), (2, 8), (8, 2)):
        msg = Image(height=h, width=w, encoding="bayer_rggb8", step=w,
                    data=rng.integers(0, 256, h * w, dtype=np.uint8).tobytes())
        with pytest.raises(codec.CodecError, match=f"is {w}x{h}; demosaicing needs at least 3x3"):
            codec.check(msg)
    raw = rng.integers(1, 256, (3, 4), dtype=np.uint8)
    msg = Image(height=3, width=4, encoding="bayer_rggb8", step=4, data=raw.tobytes())
    np.testing.assert_array_equal(codec.decode(msg, use_cv_bridge=False), cv2.cvtColor(raw, cv2.COLOR_BayerBG2RGB))


# ---------------------------------------------------------------------------------------------- short reads


def _claim_more_in_summary(mcap: Path, extra: int) -> None:
    """Add ``extra`` to every channel's count in the MCAP's Statistics record (a damaged summary section)."""
    data = bytearray(mcap.read_bytes())
    pos = struct.unpack_from("<Q", data, len(data) - 8 - 4 - 8)[0]  # footer: summary offset section start
    stats = None
    while data[pos] == 0x0E:  # Summary Offset records: group opcode, group start, group length
        if data[pos + 9] == 0x0B:
            stats = struct.unpack_from("<Q", data, pos + 10)[0]
        pos += 9 + struct.unpack_from("<Q", data, pos + 1)[0]
    assert stats is not None and data[stats] == 0x0B
    body = stats + 9
    struct.pack_into("<Q", data, body, struct.unpack_from("<Q", data, body)[0] + extra)
    entries = body + 8 + 2 + 4 * 4 + 8 + 8  # message, schema, channel, attachment, metadata, chunk counts, times
    for at in range(entries + 4, entries + 4 + struct.unpack_from("<I", data, entries)[0], 10):
        struct.pack_into("<Q", data, at + 2, struct.unpack_from("<Q", data, at + 2)[0] + extra)
    mcap.write_bytes(bytes(data))


def test_a_short_read_fails_the_bag(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _cameras(tmp_path / "in", {"/cam/image_raw": "rgb8"}, 5, StoragePlugin.MCAP)
    _claim_more_in_summary(src / "in.mcap", 2)
    meta_file = src / "metadata.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    meta["rosbag2_bagfile_information"]["topics_with_message_count"][0]["message_count"] = 7
    meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 1
    line = _error_line(capsys.readouterr().err)
    assert f"read 5 of 7 messages of {src} (/cam/image_raw: 5 of 7)" in line
    assert not out.exists()
    assert main(["play", str(src), "--rate-factor", "100"]) == 1  # play counts too
    assert "read 5 of 7 messages" in _error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- killed runs


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run_and_nothing_else(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _cameras(tmp_path / "in", {"/cam/image_raw": "rgb8"}, 3000)
    out = tmp_path / "run[1]"  # a glob would also match run1's folders
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen([sys.executable, "-m", "unet_perception.tools.bag_cli", "label", str(src), str(out),
                            "--model", str(tiny_model), "--backend", "onnxruntime", "--batch", "1"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(".partial-" in p.name for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        assert run.poll() is None, "the run ended before it was killed"
        time.sleep(0.2)
    time.sleep(1.0)  # let it write
    run.send_signal(signal.SIGKILL)
    run.wait()
    (killed,) = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    others = [f".run1.partial-{host}-{dead.pid}-abcdefgh",          # another output's, dead
              f".run[1].partial-{host}-{os.getpid()}-abcdefgh",     # a live run of this output
              f".run[1].partial-elsewhere-{dead.pid}-abcdefgh",     # another host's (a shared file system)
              ".run[1].partial-notours"]                            # not a name we make
    for name in others:
        (tmp_path / name).mkdir()
    small = _cameras(tmp_path / "small", {"/cam/image_raw": "rgb8"}, 2)
    assert _label(small, out, tiny_model) == 0
    assert f"removed {tmp_path / killed}, left by a run (process {run.pid}) that was killed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*others, "in", "run[1]", "small"])


def test_a_killed_runs_repair_copy_is_removed_by_the_next_repair_of_that_bag(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed while it read a crashed recorder's bag leaves its checkpointed copy (as large as the .db3)."""
    from test_bag_hostile import _crashed_recorder_bag

    src = _crashed_recorder_bag(tmp_path / "in", stale_metadata=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".in.repair-{host}-{dead.pid}-abcdefgh"
    live = tmp_path / f".in.repair-{host}-{os.getpid()}-abcdefgh"
    other = tmp_path / f".in2.repair-{host}-{dead.pid}-abcdefgh"
    for folder in (killed, live, other):
        (folder / "in").mkdir(parents=True)
    assert _label(src, tmp_path / "out", tiny_model) == 0
    assert f"removed {killed}, left by a run (process {dead.pid}) that was killed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "out", live.name, other.name])
