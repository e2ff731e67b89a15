"""Bag paths with ``?``, ``#`` or ``%``: rosbags opens sqlite3 files through ``file:`` URIs, where these characters
end or change the file name. Writing such an sqlite3 bag said "wrote" and left a folder without its .db3 (plus a
stray sqlite file beside it, the staging path cut at the ``?``); reading one failed deep in rosbags, or read another
file. Now both are one line before any work; MCAP, opened as a plain file, takes any name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import bag_messages
from rosbags.rosbag2 import StoragePlugin, Writer

from unet_perception.tools import bag
from unet_perception.tools.bag import IMAGE, typestore
from unet_perception.tools.bag_cli import main

NAMES = ["x?y", "h#1", "p%41"]


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    return folder


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


@pytest.mark.parametrize("name", NAMES)
def test_an_sqlite3_output_with_uri_characters_is_refused_and_mcap_is_written(
        tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    images = _images(tmp_path / "images")
    outs = tmp_path / "outs"
    outs.mkdir()
    assert main(["from-images", str(images), str(outs / name), "--storage", "sqlite3"]) == 1
    line = _error_line(capsys.readouterr().err)
    assert "URI" in line and repr(name[1]) in line and "--storage mcap" in line, line
    assert os.listdir(outs) == []  # no bag without its .db3, no stray sqlite file, no staging folder

    assert main(["from-images", str(images), str(outs / name), "--storage", "mcap"]) == 0
    assert [len(v) for v in bag_messages(outs / name).values()] == [3]


def _sqlite_bag(path: Path, n: int) -> Path:
    store = typestore()
    frame = np.zeros((24, 32, 3), dtype=np.uint8)
    with Writer(path, version=8, storage_plugin=StoragePlugin.SQLITE3) as w:
        conn = w.add_connection("/cam/image_raw", IMAGE, typestore=store)
        for i in range(n):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, i), frame_id="c")
            w.write(conn, i, store.serialize_cdr(bag.image_message(store, frame, "rgb8", header), IMAGE))
    return path


@pytest.mark.parametrize("name", NAMES)
def test_reading_an_sqlite3_bag_with_uri_characters_is_one_line(
        tmp_path: Path, name: str, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # "p%41" would open pA/bag.db3: make that a different bag, so a read of the wrong file cannot pass unseen
    _sqlite_bag(tmp_path / "other" / "bag", 2).rename(tmp_path / "pA")
    src = tmp_path / name
    _sqlite_bag(tmp_path / "bag", 5).rename(src)
    out = tmp_path / "out"
    for argv in (["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"],
                 ["play", str(src), "--rate-factor", "100"]):
        assert main(argv) == 1
        line = _error_line(capsys.readouterr().err)
        assert f"cannot read the sqlite3 bag {src}" in line and repr(name[1]) in line, line
        assert not out.exists()
    # the same bag under a plain name reads (the refusal is the name, not the bag)
    shutil.copytree(src, tmp_path / "plain")
    assert main(["label", str(tmp_path / "plain"), str(out), "--model", str(tiny_model),
                 "--backend", "onnxruntime"]) == 0
    assert len(bag_messages(out)["/cam/image_raw"]) == 5
