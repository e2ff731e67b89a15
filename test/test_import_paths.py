"""unet-import with hostile paths and counts: a FIFO as the source, the source itself or a folder as OUT, no check
frames. Each is one error line, nothing written and nothing left behind; the source is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from foreign_models import MmsegLike, export

from unet_perception.tools.import_model import main

HW = (32, 48)


@pytest.fixture(scope="module")
def mmseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(MmsegLike(19), tmp_path_factory.mktemp("src") / "mm.onnx", HW)


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), f"unet-import {argv} blocked"
    assert result == [1]
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unet-import: "), err
    return err


def test_a_fifo_source_is_named_and_never_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    out = tmp_path / "out.onnx"
    assert "FIFO" in one_line([str(fifo), str(out), "--classes", "cityscapes"], capsys)
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_the_source_as_out_is_refused_and_kept(mmseg: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    before = hashlib.sha256(mmseg.read_bytes()).hexdigest()
    link = tmp_path / "link.onnx"
    link.symlink_to(mmseg)
    for out in (mmseg, link):
        assert "is the source" in one_line([str(mmseg), str(out), "--classes", "cityscapes"], capsys)
        assert hashlib.sha256(mmseg.read_bytes()).hexdigest() == before
    assert os.listdir(mmseg.parent) == [mmseg.name]


def test_a_folder_as_out_is_one_line_and_leaves_nothing(mmseg: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "is a folder" in one_line([str(mmseg), str(out), "--classes", "cityscapes"], capsys)
    assert sorted(os.listdir(tmp_path)) == ["models"] and os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("count", ["0", "-1"])
def test_no_check_frames_is_one_line(mmseg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     count: str) -> None:
    out = tmp_path / "out.onnx"
    assert "--check-frames" in one_line([str(mmseg), str(out), "--classes", "cityscapes", "--check-frames", count],
                                        capsys)
    assert not out.exists()
