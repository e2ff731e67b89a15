"""What ``unet-bag`` checks and repairs before any work, so that no message is lost silently and nothing fails late.

Input:
* Type names in the short form some recorders and converters write (``sensor_msgs/Image``) are read as
  ``sensor_msgs/msg/Image`` (rosbags matches metadata and storage by exact type name and would read nothing).
* An sqlite3 file whose last messages are still in its ``-wal`` file (a recorder that crashed, or one still
  running) is read from a checkpointed copy (rosbags opens sqlite files immutable and would skip them).
  The input itself is never modified.
* Message counts of ``metadata.yaml`` and of the storage itself are compared before the work; the messages read
  are compared with them after it.

Output: ``OUT`` must be a new path (not an existing file or folder, not a symlink, dangling or not) in a folder we
can write, with room for the estimated output.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class BagError(RuntimeError):
    """A bag that cannot be read or written, with what is wrong and how to fix it."""


def full_type(msgtype: str) -> str:
    """``sensor_msgs/Image`` -> ``sensor_msgs/msg/Image``; full names come back unchanged."""
    parts = msgtype.split("/")
    return f"{parts[0]}/msg/{parts[1]}" if len(parts) == 2 else msgtype


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


# ---------------------------------------------------------------------------------------------- input


def _has_wal(db: Path) -> bool:
    wal = db.with_name(db.name + "-wal")
    return wal.is_file() and wal.stat().st_size > 0


def _db_types(db: Path) -> list[str]:
    try:
        with _immutable(db) as con:
            return [row[0] for row in con.execute("SELECT type FROM topics")]
    except sqlite3.Error:
        return []  # not our problem here: rosbags reports a broken file when it opens it


@contextmanager
def _immutable(db: Path) -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        yield con
    finally:
        con.close()


def storage_counts(dbs: list[Path]) -> Counter[str]:
    """Messages per topic as the sqlite3 files themselves hold them."""
    counts: Counter[str] = Counter()
    for db in dbs:
        with _immutable(db) as con:
            for topic, n in con.execute("SELECT topics.name, COUNT(messages.id) FROM topics "
                                        "LEFT JOIN messages ON messages.topic_id = topics.id GROUP BY topics.id"):
                counts[topic] += n
    return counts


def _repair_db(src: Path, dst: Path) -> int:
    """Copy ``src`` (with its ``-wal``) to ``dst``, checkpoint the copy and make its type names full.

    Returns how many messages only the WAL held.
    """
    before = sum(storage_counts([src]).values())
    shutil.copyfile(src, dst)
    if _has_wal(src):
        shutil.copyfile(src.with_name(src.name + "-wal"), dst.with_name(dst.name + "-wal"))
    con = sqlite3.connect(dst)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for (name,) in con.execute("SELECT type FROM topics").fetchall():
            if full_type(name) != name:
                con.execute("UPDATE topics SET type = ? WHERE type = ?", (full_type(name), name))
        con.commit()
        con.execute("PRAGMA journal_mode=DELETE")  # folds and removes the copy's -wal/-shm
    finally:
        con.close()
    return sum(storage_counts([dst]).values()) - before


@dataclass
class ReadableBag:
    """The path rosbags should open (the input, or a repaired view of it) and what the repair found."""

    path: Path
    dbs: list[Path]        # the sqlite3 files to count (empty for mcap)
    recovered: int = 0     # messages that were only in -wal files


def _needs_repair(db: Path) -> bool:
    return _has_wal(db) or any(full_type(t) != t for t in _db_types(db))


@contextmanager
def readable_bag(path: Path, scratch_parent: Path | None = None,
                 log: Callable[[str], None] = print) -> Iterator[ReadableBag]:
    """``path`` as rosbags can read all of it: the input itself, or a repaired view in a scratch folder.

    The view (inside ``scratch_parent``, default the system's temporary folder; removed afterwards) holds
    ``metadata.yaml`` with full type names, checkpointed copies of the sqlite3 files that need it, and links to
    every other file.
    """
    if path.is_file():  # one .db3/.mcap file, no metadata.yaml
        if path.suffix != ".db3" or not _needs_repair(path):
            yield ReadableBag(path, [path] if path.suffix == ".db3" else [])
            return
        with _scratch(path, scratch_parent) as view:
            recovered = _repair_db(path, view / path.name)
            _say_recovered(log, path, recovered)
            yield ReadableBag(view / path.name, [view / path.name], recovered)
        return
    meta_file = path / "metadata.yaml"
    try:
        meta: Any = yaml.safe_load(meta_file.read_text())
        topics = meta["rosbag2_bagfile_information"]["topics_with_message_count"]
        short = any(full_type(t["topic_metadata"]["type"]) != t["topic_metadata"]["type"] for t in topics)
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        yield ReadableBag(path, [])  # rosbags reports what is wrong with the folder when it opens it
        return
    dbs = sorted(path.glob("*.db3"))
    broken = [db for db in dbs if _needs_repair(db)]
    if not short and not broken:
        yield ReadableBag(path, dbs)
        return
    for t in topics:
        t["topic_metadata"]["type"] = full_type(t["topic_metadata"]["type"])
    with _scratch(path, scratch_parent) as scratch:
        view = scratch / path.name
        view.mkdir()
        (view / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        recovered = 0
        for f in path.iterdir():
            if f.name == "metadata.yaml" or f.name.endswith(("-wal", "-shm", "-journal")):
                continue
            if f in broken:
                recovered += _repair_db(f, view / f.name)
            else:
                (view / f.name).symlink_to(f.resolve())
        _say_recovered(log, path, recovered)
        yield ReadableBag(view, [view / db.name for db in dbs], recovered)


def _say_recovered(log: Callable[[str], None], path: Path, recovered: int) -> None:
    if recovered:
        log(f"{path}: {recovered} messages were only in the sqlite3 -wal file (a recorder that crashed?); "
            "reading them from a checkpointed copy (the input is left as it is)")


@contextmanager
def _scratch(path: Path, parent: Path | None) -> Iterator[Path]:
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.repair-", dir=parent))
    except OSError as exc:
        raise BagError(f"cannot make a folder in {parent or tempfile.gettempdir()} to repair {path}: "
                       f"{exc.strerror or exc}") from exc
    try:
        yield scratch
    except OSError as exc:  # copying a large bag can fill the disk
        raise BagError(f"cannot repair a copy of {path} in {scratch.parent}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare_counts(bag: Path, metadata: Counter[str], storage: Counter[str] | None,
                   log: Callable[[str], None] = print) -> Counter[str]:
    """The counts to expect when reading: the storage's where known (sqlite3), else metadata.yaml's.

    Refuses (BagError) when the storage holds fewer messages than metadata.yaml lists: they are lost.
    """
    if storage is None:
        return metadata
    missing = {t: (metadata[t], storage[t]) for t in metadata if storage[t] < metadata[t]}
    if missing:
        detail = ", ".join(f"{t}: {m} listed, {s} stored" for t, (m, s) in sorted(missing.items()))
        raise BagError(f"the bag {bag} has lost messages: metadata.yaml lists {sum(metadata.values())}, its "
                       f"storage holds {sum(storage.values())} ({detail}); the .db3 file is truncated or was "
                       "replaced. Nothing was written; use the original recording")
    if storage != metadata:
        log(f"{bag}: metadata.yaml lists {sum(metadata.values())} messages, the storage holds "
            f"{sum(storage.values())} (a stale metadata.yaml, as a crashed recorder leaves it); reading all of them")
    return storage


def check_read(bag: Path, expected: Counter[str], read: Counter[str]) -> None:
    """BagError unless every expected message was read."""
    short = {t: (n, read[t]) for t, n in expected.items() if read[t] != n}
    if short:
        detail = ", ".join(f"{t}: {r} of {n}" for t, (n, r) in sorted(short.items()))
        raise BagError(f"read {sum(read.values())} of {sum(expected.values())} messages of {bag} ({detail}); "
                       "the bag is damaged or changed while being read. Nothing was written")


# ---------------------------------------------------------------------------------------------- output


def check_output(out: Path, need_bytes: int = 0) -> None:
    """One-line BagError unless a new bag can be written at ``out`` (see the module docstring)."""
    if out.is_symlink():
        target = os.readlink(out)
        dangling = "" if out.exists() else ", which does not exist"
        raise BagError(f"{out} is a symlink (to {target}{dangling}); give a new path for the output bag")
    if out.exists():
        raise BagError(f"{out} exists already; choose a new output path or remove it first")
    parent = out.parent
    if not parent.is_dir():
        raise BagError(f"the folder {parent} for the output bag does not exist; create it first")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise BagError(f"cannot write in {parent}: {exc.strerror or exc}; choose a writable folder for the "
                       "output bag") from exc
    free = shutil.disk_usage(parent).free
    if need_bytes > free:
        raise BagError(f"{parent} has {_mb(free)} free, the output bag needs about {_mb(need_bytes)}; free some "
                       "space or choose another folder")
