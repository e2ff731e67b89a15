"""What ``unet-bag`` checks and repairs before any work, so that no message is lost silently and nothing fails late.

Input (read through ``bag_read.StoredBag``, which takes connections, types and counts from the storage files):
* An sqlite3 file whose last messages are still in its ``-wal`` file (a recorder that crashed, or one still
  running) is read from a checkpointed copy (rosbags opens sqlite files immutable and would skip them).
  The input itself is never modified.
* Message counts of ``metadata.yaml`` and of the storage itself (sqlite3 tables, MCAP summary) are compared
  before the work; the messages read are compared with the storage's after it.

Output: ``OUT`` must be a new path (not an existing file or folder, not a symlink, dangling or not) in a folder we
can write, with room for the estimated output.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sqlite3
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


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


@contextmanager
def _immutable(db: Path) -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(f"file:{urllib.parse.quote(os.fsencode(db))}?immutable=1", uri=True)
    try:
        yield con
    finally:
        con.close()


def _stored(db: Path) -> int:
    with _immutable(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


def _repair_db(src: Path, dst: Path) -> int:
    """Copy ``src`` (with its ``-wal``) to ``dst`` and checkpoint the copy; returns how many messages only the
    WAL held."""
    before = _stored(src)
    shutil.copyfile(src, dst)
    if _has_wal(src):
        shutil.copyfile(src.with_name(src.name + "-wal"), dst.with_name(dst.name + "-wal"))
    con = sqlite3.connect(dst)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode=DELETE")  # folds and removes the copy's -wal/-shm
    finally:
        con.close()
    return _stored(dst) - before


URI_CHARACTERS = "?#%"  # what ends or changes a file name in a ``file:`` URI


def check_sqlite_read(bag: Path, path: Path | None = None) -> None:
    """BagError unless rosbags can open the sqlite3 files of ``path`` (default ``bag``; a repaired view of it).

    rosbags opens sqlite3 files through ``file:PATH`` URIs (and decompresses ``.db3.zstd`` files under their own
    names): a ``?`` or ``#`` ends the file name there and ``%XX`` is decoded, so such a path opens no file or
    another one. MCAP files are opened as plain files and may be named anything.
    """
    path = bag if path is None else path
    try:
        files = [path] if path.is_file() else sorted(path.iterdir()) if path.is_dir() else []
    except OSError:
        return  # rosbags says what is wrong with the folder when it opens it
    for f in files:
        if ".db3" in f.name and set(str(f.absolute())) & set(URI_CHARACTERS):
            where = "" if path == bag else f" (its repaired copy {f})"
            raise BagError(f"cannot read the sqlite3 bag {bag}{where}: rosbags opens sqlite3 files through a URI, "
                           f"in which {_uri_characters(f)} is not part of a file name; rename the bag (or a folder "
                           "above it), or link it under a name without ?, # and %")


def check_sqlite_write(out: Path) -> None:
    """BagError unless an sqlite3 bag written at ``out`` keeps its .db3 (see ``check_sqlite_read``): rosbags' writer
    would cut the URI at ``?``/``#`` and write the database somewhere else, or nowhere."""
    if set(str(out.absolute())) & set(URI_CHARACTERS):
        raise BagError(f"cannot write an sqlite3 bag at {out}: rosbags opens sqlite3 files through a URI, in which "
                       f"{_uri_characters(out)} is not part of a file name (the .db3 would be lost); choose a path "
                       "without ?, # and %, or use --storage mcap")


def _uri_characters(path: Path) -> str:
    return " and ".join(repr(c) for c in URI_CHARACTERS if c in str(path.absolute()))


@dataclass
class ReadableBag:
    """The path rosbags should open (the input, or a repaired view of it) and what the repair found."""

    path: Path
    recovered: int = 0     # messages that were only in -wal files


@contextmanager
def readable_bag(path: Path, scratch_parent: Path | None = None,
                 log: Callable[[str], None] = print) -> Iterator[ReadableBag]:
    """``path`` as rosbags can read all of it: the input itself, or a repaired view in a scratch folder.

    The view (inside ``scratch_parent``, default the system's temporary folder; removed afterwards) holds
    checkpointed copies of the sqlite3 files with a ``-wal`` and links to every other file.
    """
    if path.is_file():  # one .db3/.mcap file, no metadata.yaml
        if path.suffix != ".db3" or not _has_wal(path):
            yield ReadableBag(path)
            return
        with _scratch(path, scratch_parent, log) as view:
            recovered = _repair_db(path, view / path.name)
            _say_recovered(log, path, recovered)
            yield ReadableBag(view / path.name, recovered)
        return
    broken = [db for db in sorted(path.glob("*.db3")) if _has_wal(db)] if path.is_dir() else []
    if not broken:
        yield ReadableBag(path)  # rosbags reports what is wrong with the folder when it opens it
        return
    with _scratch(path, scratch_parent, log) as scratch:
        view = scratch / path.name
        view.mkdir()
        recovered = 0
        for f in path.iterdir():
            if f.name.endswith(("-wal", "-shm", "-journal")):
                continue
            if f in broken:
                recovered += _repair_db(f, view / f.name)
            else:
                (view / f.name).symlink_to(f.resolve())
        _say_recovered(log, path, recovered)
        yield ReadableBag(view, recovered)


def _say_recovered(log: Callable[[str], None], path: Path, recovered: int) -> None:
    if recovered:
        log(f"{path}: {recovered} messages were only in the sqlite3 -wal file (a recorder that crashed?); "
            "reading them from a checkpointed copy (the input is left as it is)")


@contextmanager
def _scratch(path: Path, parent: Path | None, log: Callable[[str], None]) -> Iterator[Path]:
    folder = parent or Path(tempfile.gettempdir())
    remove_dead_runs(folder, run_prefix(path.name, "repair"), log)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=run_prefix(path.name, "repair", os.getpid()), dir=folder))
    except OSError as exc:
        raise BagError(f"cannot make a folder in {parent or tempfile.gettempdir()} to repair {path}: "
                       f"{exc.strerror or exc}") from exc
    try:
        yield scratch
    except OSError as exc:  # copying a large bag can fill the disk
        raise BagError(f"cannot repair a copy of {path} in {scratch.parent}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def compare_counts(bag: Path, listed: Counter[str] | None, stored: Counter[str],
                   log: Callable[[str], None] = print) -> Counter[str]:
    """The counts to expect when reading: the storage's (sqlite3 tables, MCAP summary section).

    Refuses (BagError) when the storage holds fewer messages than metadata.yaml lists: they are lost. More
    stored than listed (a stale metadata.yaml, as a crashed or still running recorder leaves it) is a notice.
    ``listed`` is None for a lone .db3/.mcap file: there is nothing to compare.
    """
    if listed is None:
        return stored
    missing = {t: (listed[t], stored[t]) for t in listed if stored[t] < listed[t]}
    if missing:
        detail = ", ".join(f"{t}: {m} listed, {s} stored" for t, (m, s) in sorted(missing.items()))
        raise BagError(f"the bag {bag} has lost messages: metadata.yaml lists {sum(listed.values())}, its "
                       f"storage holds {sum(stored.values())} ({detail}); a storage file is truncated or was "
                       "replaced. Nothing was written; use the original recording")
    if +stored != +listed:
        log(f"{bag}: metadata.yaml lists {sum(listed.values())} messages, the storage holds "
            f"{sum(stored.values())} (a stale metadata.yaml, as a crashed recorder leaves it); reading all of them")
    return stored


def check_read(bag: Path, expected: Counter[str], read: Counter[str]) -> None:
    """BagError unless every expected message was read."""
    short = {t: (n, read[t]) for t, n in expected.items() if read[t] != n}
    if short:
        detail = ", ".join(f"{t}: {r} of {n}" for t, (n, r) in sorted(short.items()))
        raise BagError(f"read {sum(read.values())} of {sum(expected.values())} messages of {bag} ({detail}); "
                       "the bag is damaged or changed while being read. Nothing was written")


# ---------------------------------------------------------------------------------------------- killed runs


def run_prefix(name: str, kind: str, pid: int | None = None) -> str:
    """The name of a run's hidden folder for ``name`` on this host, up to mkdtemp's 8 random characters:
    ``.NAME.KIND-HOST-`` (then ``PID-``): what a killed run leaves can be told apart and removed."""
    return f".{name}.{kind}-{socket.gethostname()}-" + ("" if pid is None else f"{pid}-")


def remove_dead_runs(folder: Path, prefix: str, log: Callable[[str], None]) -> None:
    """Remove the folders in ``folder`` that runs killed outright (SIGKILL, power loss) left: exactly ``prefix``
    (``run_prefix`` without a pid) plus ``PID-`` and 8 mkdtemp characters, of a process that no longer runs.

    Names are compared, never globbed (``run1``'s folders are safe from ``run[1]``'s clean-up); another host's
    (a shared file system) and live runs' stay.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return  # the caller's own checks say what is wrong with the folder
    for name in names:
        match = re.fullmatch(r"(\d+)-[a-z0-9_]{8}", name[len(prefix):]) if name.startswith(prefix) else None
        if match is None or process_alive(int(match.group(1))):
            continue
        shutil.rmtree(folder / name, ignore_errors=True)
        log(f"removed {folder / name}, left by a run (process {match.group(1)}) that was killed")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


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
