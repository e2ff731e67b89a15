"""Where a ``label-many`` run works, and how it cleans up only what it made.

A run works in one hidden folder in the output folder, ``DIR/.label-many.partial-<32 hex>``: bag number ``i`` of
the run is labelled in ``<that folder>/<i>/attempt-<k>/NAME`` and renamed to ``DIR/NAME`` when complete. No name in
there derives from a bag's name, so a bag called ``run[1]``, ``*`` or ``a b`` cannot reach another bag's work.
The run's folder is named in ``DIR/.label-many.lock``, which the run holds locked (``flock``) from start to end:

* a second run on the same ``DIR`` while one works there is refused with one line, not interleaved with it;
* a run that was killed (SIGKILL, a lost machine) leaves its folder named in the lock file; the next run on
  ``DIR`` removes exactly that folder, after checking that the name is one this module makes;
* nothing is ever found by pattern: no glob, no prefix match over ``DIR``.

At the end of a run its folder is removed and then the lock file; a folder that could not be removed whole stays
named in the lock file, so the next run tries again.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from unet_perception.tools.bag import BagError

LOCK_NAME = ".label-many.lock"
RUN_PREFIX = ".label-many.partial-"
RUN_NAME = re.compile(r"\.label-many\.partial-[0-9a-f]{32}")


def attempt_folder(work: Path, attempt: int) -> Path:
    """The folder of attempt ``attempt`` at one bag (its ``work`` folder from ``run_folder``): the attempts before
    it are removed first, by their exact names (a worker that died on one left it behind)."""
    for earlier in range(1, attempt):
        shutil.rmtree(work / f"attempt-{earlier}", ignore_errors=True)
    folder = work / f"attempt-{attempt}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@contextmanager
def run_folder(out_dir: Path) -> Iterator[Path]:
    """This run's hidden work folder in ``out_dir`` (created with its parents), locked for the run and removed at
    its end; the folder of a killed run before it is removed first. A ``BagError`` when another run holds
    ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    fd = _hold(lock)
    try:
        previous = os.pread(fd, 256, 0).decode("ascii", "replace").strip()
        if not _remove_run(out_dir, previous):
            raise BagError(f"cannot remove {out_dir / previous}, the work folder of an earlier run that was "
                           "killed; remove it by hand")
        run = out_dir / f"{RUN_PREFIX}{uuid.uuid4().hex}"
        _record(fd, run.name)  # named before it exists: a kill from here on leaves it findable
        run.mkdir()
        try:
            yield run
        finally:
            if _remove_run(out_dir, run.name):
                _record(fd, "")
                lock.unlink(missing_ok=True)  # while still held: a run that opened it meanwhile sees that (_hold)
    finally:
        os.close(fd)


def _hold(lock: Path) -> int:
    """An open, exclusively locked descriptor of the lock file ``lock`` (a regular file, never followed)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BagError(f"cannot open {lock}, the lock of label-many runs in this folder: {exc.strerror}; "
                           "remove it if it is not a file this tool made") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BagError(f"{lock} is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise BagError(f"another label-many run is writing into {lock.parent}; wait for it to end or "
                               "give another --out") from exc
            try:
                same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the run that held it removed it as we opened it: take the new one


def _record(fd: int, name: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (name + "\n").encode("ascii") if name else b"", 0)
    os.fsync(fd)


def _remove_run(out_dir: Path, name: str) -> bool:
    """Remove ``out_dir/name`` if ``name`` is a run folder's name and it is a real folder (not a link); whether
    nothing of it is left. Any other name is left alone (and counts as removed)."""
    if not RUN_NAME.fullmatch(name):
        return True  # empty, or not a name this module makes: touch nothing
    path = out_dir / name
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return True
    except FileNotFoundError:
        return True
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)
