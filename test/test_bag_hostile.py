"""unet-bag on hostile bags and hostile output places, with real files (and real small tmpfs mounts where allowed).

No message is lost silently (crashed-recorder WAL files, metadata.yaml against the storage), short type names
are read, cameras whose outputs would collide are refused with advice that works, every bad output place is one
line before the work, and compressed bombs inside a bag are refused before decoding, as in the node.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import Reader, Writer

import hostile
from unet_perception.tools import bag
from unet_perception.tools.bag import COMPRESSED, IMAGE, BagError, label_bag, typestore
from unet_perception.tools.bag_cli import main
from unet_perception.tools.bag_play import message_class

START = 1_700_000_000_000_000_000


def _write(path: Path, cameras: dict[str, str], n: int, size: tuple[int, int] = (60, 80)) -> Path:
    """A sqlite3 bag with ``n`` frames on each camera topic (``{topic: msgtype}``)."""
    store = typestore()
    frame = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    png = hostile.encode(frame, ".png")
    with Writer(path, version=8) as w:
        conns = {t: w.add_connection(t, msgtype, typestore=store) for t, msgtype in cameras.items()}
        for i in range(n):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i), frame_id="c")
            for conn in conns.values():
                if conn.msgtype == IMAGE:
                    msg = bag.image_message(store, frame, "rgb8", header)
                else:
                    msg = store.types[COMPRESSED](header=header, format="png", data=np.frombuffer(png, np.uint8))
                w.write(conn, START + i, store.serialize_cdr(msg, conn.msgtype))
    return path


def _label(src: Path, out: Path, model: Path, *extra: str) -> int:
    return main(["label", str(src), str(out), "--model", str(model), "--backend", "onnxruntime", *extra])


def _count(path: Path) -> dict[str, int]:
    with Reader(path) as reader:
        counts: dict[str, int] = {}
        for conn, _, _ in reader.messages():
            counts[conn.topic] = counts.get(conn.topic, 0) + 1
        return counts


def _nothing_at(out: Path) -> None:
    assert not out.exists() and not out.is_symlink() or out.is_symlink() and not out.exists()
    assert not [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".repair-" in p.name]


# ---------------------------------------------------------------------------------------------- crashed recorder

CRASH = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA wal_autocheckpoint=0")
rows = con.execute("SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp DESC LIMIT 1").fetchall()
for k in range(int(sys.argv[2])):
    con.execute("INSERT INTO messages(topic_id, timestamp, data) VALUES (?, ?, ?)",
                (rows[0][0], rows[0][1] + 1 + k, rows[0][2]))
con.commit()
os._exit(0)  # the recorder dies: no checkpoint, the last messages stay in the -wal file
"""


def _crashed_recorder_bag(path: Path, stale_metadata: bool) -> Path:
    """7 messages in the .db3, 3 more only in its -wal; metadata.yaml lists 7 (stale) or all 10."""
    _write(path, {"/camera/image_raw": IMAGE}, 7)
    subprocess.run([sys.executable, "-c", CRASH, str(path / f"{path.name}.db3"), "3"], check=True)
    assert (path / f"{path.name}.db3-wal").stat().st_size > 0
    if not stale_metadata:
        meta_file = path / "metadata.yaml"
        meta = yaml.safe_load(meta_file.read_text())
        info = meta["rosbag2_bagfile_information"]
        info["message_count"] = 10
        info["topics_with_message_count"][0]["message_count"] = 10
        meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


@pytest.mark.parametrize("stale_metadata", [True, False], ids=["metadata-lists-7", "metadata-lists-10"])
def test_crashed_recorder_wal_messages_are_read(tmp_path: Path, tiny_model: Path, stale_metadata: bool,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = _crashed_recorder_bag(tmp_path / "in", stale_metadata)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 0
    report = capsys.readouterr().out
    counts = _count(out)
    assert counts["/camera/image_raw"] == 10 and counts["/camera/segmentation/labels"] == 10
    assert "3 messages were only in the sqlite3 -wal file" in report
    listed = 7 if stale_metadata else 10
    assert f"metadata.yaml lists {listed}, the storage holds 10 (3 recovered from -wal), 10 read" in report
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the input is left as it is
    _nothing_at(tmp_path / "none")


def test_storage_with_fewer_messages_than_metadata_is_refused(tmp_path: Path, tiny_model: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = _write(tmp_path / "in", {"/camera/image_raw": IMAGE}, 5)
    meta_file = src / "metadata.yaml"
    meta_file.write_text(meta_file.read_text().replace("message_count: 5", "message_count: 8"))
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 1
    err = capsys.readouterr().err
    assert "has lost messages: metadata.yaml lists 8, its storage holds 5" in err and "Traceback" not in err
    _nothing_at(out)


# ---------------------------------------------------------------------------------------------- type names


@pytest.mark.parametrize("where", ["metadata", "metadata-and-db"])
def test_short_type_names(tmp_path: Path, tiny_model: Path, where: str) -> None:
    src = _write(tmp_path / "in", {"/a/image_raw": IMAGE, "/b/image_raw/compressed": COMPRESSED}, 3)
    meta_file = src / "metadata.yaml"
    meta_file.write_text(meta_file.read_text().replace("sensor_msgs/msg/", "sensor_msgs/"))
    if where == "metadata-and-db":
        import sqlite3

        with sqlite3.connect(src / "in.db3") as db:
            db.execute("UPDATE topics SET type = replace(type, 'sensor_msgs/msg/', 'sensor_msgs/')")
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 0
    counts = _count(out)
    assert counts["/a/segmentation/labels"] == counts["/b/segmentation/labels"] == 3
    with Reader(out) as reader:
        assert {c.topic: c.msgtype for c in reader.connections}["/a/image_raw"] == IMAGE
    assert message_class("sensor_msgs/Image", "/a/image_raw").__name__ == "Image"  # play takes them too


# ---------------------------------------------------------------------------------------------- collisions


@pytest.mark.parametrize("cameras, phrase", [
    ({"/cam/left": IMAGE, "/cam/right": IMAGE}, "give each camera its own namespace"),
    ({"/cam/image_raw": IMAGE, "/cam/image_raw/compressed": COMPRESSED}, "raw and compressed topics of one camera"),
], ids=["one-namespace", "raw-and-compressed"])
def test_cameras_sharing_outputs_are_refused_with_advice_that_works(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], cameras: dict[str, str],
        phrase: str) -> None:
    src = _write(tmp_path / "in", cameras, 2)
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 1
    err = capsys.readouterr().err
    assert "would both publish on /cam/segmentation/*" in err and phrase in err and "--topics" in err
    assert "Traceback" not in err and "can only be added once" not in err
    _nothing_at(out)
    first = next(iter(cameras))
    assert _label(src, out, tiny_model, "--topics", first) == 0
    assert _count(out)["/cam/segmentation/labels"] == 2


# ---------------------------------------------------------------------------------------------- output places


def test_dangling_symlink_as_out(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write(tmp_path / "in", {"/camera/image_raw": IMAGE}, 2)
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "gone")
    assert _label(src, out, tiny_model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a symlink (to" in err and "which does not exist" in err
    assert not (tmp_path / "gone").exists() and out.is_symlink()


def test_bad_alpha_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither the bag nor the model exists: the first (and only) complaint is the option."""
    started = time.monotonic()
    assert main(["label", str(tmp_path / "no_bag"), str(tmp_path / "out"), "--alpha", "2",
                 "--model", str(tmp_path / "no.onnx")]) == 1
    err = capsys.readouterr().err
    assert "--alpha: overlay alpha must be in [0, 1], got 2.0" in err and err.count("\n") == 1
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_max_pixels_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   value: str) -> None:
    """0 must not silently mean the default, nor a negative limit refuse every frame as 'over the limit'."""
    assert main(["label", str(tmp_path / "no_bag"), str(tmp_path / "out"), "--max-pixels", value,
                 "--model", str(tmp_path / "no.onnx")]) == 1
    err = capsys.readouterr().err
    assert f"--max-pixels must be >= 1, got {value}" in err and err.count("\n") == 1
    with pytest.raises(BagError, match="--max-pixels must be >= 1"):
        label_bag(tmp_path / "no_bag", tmp_path / "out", None, max_pixels=int(value), progress=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs at tmp_path/mnt (needs root: mount); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip() or run.returncode}); needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_output_folder(tmp_path: Path, tiny_model: Path, tmpfs: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = _write(tmp_path / "in", {"/camera/image_raw": IMAGE}, 2)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert _label(src, tmpfs / "out", tiny_model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write in {tmpfs}: Read-only file system" in err
    assert os.listdir(tmpfs) == []


def test_full_disk_is_refused_before_the_work(tmp_path: Path, tiny_model: Path, tmpfs: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = _write(tmp_path / "in", {"/camera/image_raw": IMAGE}, 40, size=(120, 160))  # outputs ~ 2.4 MB
    assert _label(src, tmpfs / "out", tiny_model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free, the output bag needs about" in err
    assert os.listdir(tmpfs) == []


def test_disk_filling_up_during_the_work(tmp_path: Path, tiny_model: Path, tmpfs: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """When the estimate is wrong (here: forced to 0) the full disk is still one line, and nothing is left."""
    src = _write(tmp_path / "in", {"/camera/image_raw": IMAGE}, 40, size=(120, 160))
    monkeypatch.setattr(bag, "_bag_bytes", lambda path: 0)
    monkeypatch.setattr(bag, "_frame_pixels", lambda *args: 0)
    assert _label(src, tmpfs / "out", tiny_model) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "error:" in line]  # besides the progress bar
    assert "writing" in line and "failed" in line
    assert "disk is full" in line or "No space left on device" in line
    assert "Traceback" not in err and os.listdir(tmpfs) == []


# ---------------------------------------------------------------------------------------------- bombs in a bag


def test_compressed_bombs_in_a_bag_are_refused_before_decoding(tmp_path: Path, tiny_model: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    store = typestore()
    src = tmp_path / "in"
    good = hostile.encode(hostile.textured(48, 64), ".jpg")
    payloads = [(name, fmt, build()) for name, (build, fmt, _) in hostile.CLASSES.items()]
    with Writer(src, version=8) as w:
        conn = w.add_connection("/camera/image_raw/compressed", COMPRESSED, typestore=store)
        for i, (_, fmt, data) in enumerate([("good", "jpeg", good), *payloads, ("good", "jpeg", good)]):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i), frame_id="c")
            msg = store.types[COMPRESSED](header=header, format=fmt, data=np.frombuffer(data, np.uint8))
            w.write(conn, START + i, store.serialize_cdr(msg, COMPRESSED))
    out = tmp_path / "out"
    assert _label(src, out, tiny_model, "--max-pixels", str(640 * 480)) == 0
    report = capsys.readouterr()
    assert f"{len(payloads)} errors" in report.out and "2 frames labelled" in report.out
    lines = [line for line in (report.out + report.err).splitlines() if line.startswith("skipped")]
    for (name, _, _), line, (_, _, phrase) in zip(payloads, lines, hostile.CLASSES.values(), strict=True):
        assert phrase in line, (name, line)
    assert _count(out)["/camera/segmentation/labels"] == 2


def test_frames_with_an_invalid_stamp_are_skipped_as_in_the_node(tmp_path: Path, tiny_model: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """nanosec >= 1e9 (or a negative sec) is not a time: the node refuses such a frame as bad input, and so does
    `unet-bag label` (before, it labelled it and wrote the invalid stamp into every output)."""
    store = typestore()
    src = tmp_path / "in"
    frame = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    stamps = [(1, 0), (2, 1_000_000_000), (-3, 5), (4, 999_999_999)]
    with Writer(src, version=8) as w:
        conn = w.add_connection("/camera/image_raw", IMAGE, typestore=store)
        for i, (sec, nanosec) in enumerate(stamps):
            stamp = store.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec)
            header = store.types["std_msgs/msg/Header"](stamp=stamp, frame_id="c")
            w.write(conn, START + i, store.serialize_cdr(bag.image_message(store, frame, "rgb8", header), IMAGE))
    out = tmp_path / "out"
    assert _label(src, out, tiny_model) == 0
    report = capsys.readouterr()
    skipped = [line for line in (report.out + report.err).splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and all("is not a valid time" in line for line in skipped), skipped
    assert "sec=2 nanosec=1000000000" in skipped[0] and "sec=-3 nanosec=5" in skipped[1]
    with Reader(out) as reader:
        labels = [store.deserialize_cdr(raw, c.msgtype).header.stamp for c, _, raw in reader.messages()
                  if c.topic == "/camera/segmentation/labels"]
    assert [(s.sec, s.nanosec) for s in labels] == [(1, 0), (4, 999_999_999)]
