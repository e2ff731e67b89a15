"""unet-bag on bags other recorders made: rosbag2's own test bags (test/data/rosbag2, see its README) and bags
written here with rosbags the way other tools write them (short type spelling, zstd per message or per file, a
stale metadata.yaml). Every bag is handled or refused with one line; none is read short or fails after the work.

References never come from the code under test: input messages are read file by file with rosbags' storage
readers, frames are decoded with NumPy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, bag_messages
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.rosbag2.enums import CompressionFormat, CompressionMode

from unet_perception.tools import bag
from unet_perception.tools.bag import IMAGE, BagError, label_bag, typestore
from unet_perception.tools.bag_cli import main
from unet_perception.tools.bag_preflight import full_type

DATA = REPO / "test" / "data" / "rosbag2"
START = 1_700_000_000_000_000_000

# bag -> the messages a faithful copy holds, or the phrase of the one line that refuses it
OUTCOMES: dict[str, int | str] = {
    "sqlite3/cdr_test": 7,
    "mcap/cdr_test": 7,
    "sqlite3/bag_with_topics_and_service_events": "unknown message type 'test_msgs/srv/BasicTypes_Event'",
    "mcap/bag_with_topics_and_service_events": 10,
    "sqlite3/wrong_rmw_test": "Serialization format {'wrong_format'} is not supported",
    "mcap/wrong_rmw_test": "Serialization format {'wrong_format'} is not supported",
    "sqlite3/talker": 20,
    "mcap/talker": 20,
    "mcap/convert_a": 150,
    "mcap/wbag": 6074,
    "sqlite3/empty_bag": "has no messages",
    "sqlite3/test_bag_for_seek": "unknown message type 'test_msgs/msg/BasicTypes'",
    "mcap/test_bag_for_seek": 5,
}


def test_every_resource_has_an_outcome() -> None:
    assert sorted(OUTCOMES) == sorted(f"{p.parent.name}/{p.name}" for p in DATA.glob("*/*") if p.is_dir())


def stored_messages(src: Path) -> dict[str, list[tuple[int, bytes]]]:
    """topic -> sorted [(timestamp, message)] as the storage files hold them, each file read on its own."""
    info = yaml.safe_load((src / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    out: dict[str, list[tuple[int, bytes]]] = {}
    for name in info["relative_file_paths"]:
        with Reader(src / Path(name).name) as reader:
            for conn, ts, raw in reader.messages():
                out.setdefault(conn.topic, []).append((ts, bytes(raw)))
    return {t: sorted(m) for t, m in out.items()}


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_label(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    src, out = DATA / name, tmp_path / "out"
    rc = main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"])
    report = capsys.readouterr()
    expected = OUTCOMES[name]
    if isinstance(expected, str):
        assert rc == 1 and expected in _one_error_line(report.err)
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
        return
    assert rc == 0, report.err
    assert "no sensor_msgs/msg/Image or CompressedImage topic" in report.out
    assert f"{out} is a copy of its {expected} messages" in report.out
    copied = {t: sorted(m) for t, m in bag_messages(out).items()}
    assert copied == stored_messages(src)
    assert sum(len(m) for m in copied.values()) == expected
    with Reader(src) as listed, Reader(out) as written:  # every topic, empty ones included, with its type
        assert ({(c.topic, full_type(c.msgtype)) for c in listed.connections}
                == {(c.topic, c.msgtype) for c in written.connections})


@pytest.mark.parametrize("name", sorted(OUTCOMES))
def test_play(capsys: pytest.CaptureFixture[str], name: str) -> None:
    rc = main(["play", str(DATA / name), "--rate-factor", "1000"])
    report = capsys.readouterr()
    expected = OUTCOMES[name]
    if name.endswith(("talker", "wbag")):  # std_msgs and rcl_interfaces: installed with rclpy
        assert rc == 0, report.err
        assert f"published {expected} messages" in report.out
        return
    assert rc == 1
    line = _one_error_line(report.err)
    if isinstance(expected, str) and "unknown message type" not in expected:
        assert expected in line
    else:  # test_msgs and rosbag2_interfaces have no Python package here
        assert "its Python package is not installed" in line


@pytest.mark.fleet
def test_label_many_over_all_of_them(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    import json

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in OUTCOMES:  # sqlite3/x and mcap/x would share the output name x
        (inputs / name.replace("/", "-")).symlink_to(DATA / name)
    out = tmp_path / "out"
    rc = main(["label-many", *map(str, sorted(inputs.iterdir())), "--out", str(out), "--model", str(tiny_model),
               "--workers", "1"])
    report = capsys.readouterr()
    assert rc == 1 and "Traceback" not in report.err
    results = {r["name"]: r for r in json.loads((out / "label-many.json").read_text())["results"]}
    for name, expected in OUTCOMES.items():
        result = results[name.replace("/", "-")]
        if isinstance(expected, str):
            assert result["status"] == "failed" and expected in result["error"], result
        else:
            assert result["status"] == "labelled", result
            assert any("nothing to label" in line for line in result["notices"])
            copied = {t: sorted(m) for t, m in bag_messages(out / result["name"]).items()}
            assert copied == stored_messages(DATA / name)


# ---------------------------------------------------------------------------------------------- other recorders


def _frames(n: int, hw: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (*hw, 3), dtype=np.uint8) for i in range(n)]


def recorded_bag(path: Path, storage: StoragePlugin, n: int, *, type_name: str = "sensor_msgs/Image",
                 compression: CompressionMode | None = None, version: int = 5,
                 hw: tuple[int, int] = (48, 64), listed_type: str | None = None) -> Path:
    """An rgb8 camera bag as other recorders write it: the type spelled ``type_name`` in the storage (MCAP
    schema, or the .db3's topics table) and in metadata.yaml (or ``listed_type`` there), zstd ``compression``,
    metadata ``version``."""
    store = typestore()
    writer = Writer(path, version=8, storage_plugin=storage)
    if compression is not None:
        writer.set_compression(compression, CompressionFormat.ZSTD)
    msgdef, _ = store.generate_msgdef(IMAGE, ros_version=2)
    with writer:
        conn = writer.add_connection("/cam/image_raw", type_name, msgdef=msgdef, rihs01=store.hash_rihs01(IMAGE))
        for i, frame in enumerate(_frames(n, hw)):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i * 10**8), frame_id="c")
            writer.write(conn, START + i * 10**8,
                         store.serialize_cdr(bag.image_message(store, frame, "rgb8", header), IMAGE))
    meta_file = path / "metadata.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    meta["rosbag2_bagfile_information"]["version"] = version
    for topic in meta["rosbag2_bagfile_information"]["topics_with_message_count"]:
        topic["topic_metadata"]["type"] = listed_type or type_name
    meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))
    return path


@pytest.mark.parametrize("storage", [StoragePlugin.MCAP, StoragePlugin.SQLITE3], ids=["mcap", "sqlite3"])
@pytest.mark.parametrize("compression", [CompressionMode.MESSAGE, CompressionMode.FILE, None],
                         ids=["zstd-message", "zstd-file", "plain"])
def test_short_type_spelling_and_zstd(tmp_path: Path, tiny_model: Path, storage: StoragePlugin,
                                      compression: CompressionMode | None) -> None:
    """The bug of issue 15: a 640x480 MCAP with per-message zstd and `sensor_msgs/Image` read 0 of 2 messages."""
    hw = (480, 640) if storage == StoragePlugin.MCAP and compression == CompressionMode.MESSAGE else (48, 64)
    src = recorded_bag(tmp_path / "in", storage, 2, compression=compression, hw=hw)
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"]) == 0
    written = bag_messages(out)
    assert written["/cam/image_raw"] == bag_messages(src)["/cam/image_raw"]  # rosbags decompresses the input
    labels = written["/cam/segmentation/labels"]
    store = typestore()
    assert [store.deserialize_cdr(raw, IMAGE).data.size for _, raw in labels] == [hw[0] * hw[1]] * 2
    with Reader(out) as reader:
        assert {c.topic: c.msgtype for c in reader.connections}["/cam/image_raw"] == IMAGE


@pytest.mark.parametrize("stored, listed", [("sensor_msgs/Image", IMAGE), (IMAGE, "sensor_msgs/Image")],
                         ids=["short-in-mcap", "short-in-metadata"])
def test_metadata_and_storage_spelling_the_type_differently(tmp_path: Path, tiny_model: Path, stored: str,
                                                            listed: str) -> None:
    src = recorded_bag(tmp_path / "in", StoragePlugin.MCAP, 3, type_name=stored, listed_type=listed,
                       compression=CompressionMode.MESSAGE)
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"]) == 0
    assert len(bag_messages(out)["/cam/segmentation/labels"]) == 3


def _set_listed(src: Path, n: int) -> None:
    meta_file = src / "metadata.yaml"
    meta = yaml.safe_load(meta_file.read_text())
    info = meta["rosbag2_bagfile_information"]
    info["message_count"] = info["topics_with_message_count"][0]["message_count"] = n
    meta_file.write_text(yaml.safe_dump(meta, sort_keys=False))


class NoWork:
    """A segmenter that fails the test if any frame reaches it: what is refused must be refused before."""

    backend = None

    def run(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        raise AssertionError("the work started")


@pytest.mark.parametrize("storage", [StoragePlugin.MCAP, StoragePlugin.SQLITE3], ids=["mcap", "sqlite3"])
def test_stale_metadata_is_a_notice_and_lost_messages_are_refused_before_the_work(
        tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str], storage: StoragePlugin) -> None:
    src = recorded_bag(tmp_path / "in", storage, 5, type_name=IMAGE, version=8)
    _set_listed(src, 3)  # metadata.yaml written before the last 2 messages: stale
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"]) == 0
    report = capsys.readouterr().out
    assert "metadata.yaml lists 3 messages, the storage holds 5 (a stale metadata.yaml" in report
    assert Counter(t for t, m in bag_messages(out).items() for _ in m)["/cam/segmentation/labels"] == 5

    _set_listed(src, 8)  # the storage really lost 3 of 8
    with pytest.raises(BagError, match="has lost messages: metadata.yaml lists 8, its storage holds 5"):
        label_bag(src, tmp_path / "out2", NoWork(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
