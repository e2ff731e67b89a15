"""atomic_file.replacing, the one way export, quantize, retrofit, checkpoints and unet-import write their files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from unet_perception.atomic_file import replacing, umask


def test_a_new_target_appears_whole_readable_and_writable_by_its_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.onnx"  # the folder is created
    with replacing(target) as f:
        f.write(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new" and list(target.parent.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o644 & ~umask()  # not mkstemp's 0600, never group-writable


def test_an_existing_target_keeps_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    target.chmod(0o600)
    with replacing(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o600


def test_the_umask_is_read_without_changing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from /proc, not set and set back: setting it, even for a moment, would let another thread create a
    file with a mode nobody asked for."""
    expected = os.umask(0o027)
    os.umask(expected)

    def no_setting(mask: int) -> int:
        raise AssertionError("umask set")

    monkeypatch.setattr(os, "umask", no_setting)
    assert umask() == expected


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="graph refused"), replacing(target) as f:
        f.write(b"half")
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
        assert first.name != second.name
        first.write(b"first")
        second.write(b"second")
    assert target.read_bytes() == b"first" and victim.read_bytes() == b"untouched"


def test_a_link_swapped_in_for_the_temporary_never_receives_the_bytes(tmp_path: Path) -> None:
    """Someone who can write to the folder replaces the temporary with a link while the model is written: the
    bytes go to the file that was created (through its descriptor), never through the link, and the link is not
    renamed onto the target."""
    target = tmp_path / "m.onnx"
    victim = tmp_path / "victim"
    victim.write_bytes(b"secret")
    victim.chmod(0o600)
    with pytest.raises(OSError, match="replaced by someone else"), replacing(target) as f:
        (temporary,) = (p for p in tmp_path.iterdir() if p.name.startswith(".m.onnx."))
        temporary.unlink()
        temporary.symlink_to(victim)
        f.write(b"model")
    assert victim.read_bytes() == b"secret" and victim.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]
