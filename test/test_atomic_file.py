"""atomic_file.replacing, the one way export, quantize, retrofit, checkpoints and unet-import write their files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unet_perception.atomic_file import replacing


def test_the_target_is_replaced_whole_with_an_ordinary_files_mode(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.onnx"  # the folder is created
    with replacing(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not target.exists()
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(target.parent.iterdir()) == [target]
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o644 & ~mask  # not mkstemp's 0600: the node's user must read it


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="graph refused"), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("graph refused")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_two_writers_of_one_target_never_share_a_temporary_nor_follow_a_planted_link(tmp_path: Path) -> None:
    """Before, every writer staged at the fixed name '<target>.tmp': two exports at once wrote into one file, and a
    link planted there was followed."""
    target = tmp_path / "m.onnx"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "m.onnx.tmp").symlink_to(victim)
    with replacing(target) as first, replacing(target) as second:
        assert first != second and not first.is_symlink() and not second.is_symlink()
        first.write_bytes(b"first")
        second.write_bytes(b"second")
    assert target.read_bytes() == b"first" and victim.read_bytes() == b"untouched"
