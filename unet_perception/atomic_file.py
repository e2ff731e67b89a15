"""Files that appear whole or not at all: written under a fresh temporary name beside the target, then renamed.

The temporary file is made by ``tempfile.mkstemp`` (O_EXCL: never an existing file or a link someone planted, and
two runs writing the same target never share it) and written through the descriptor mkstemp opened, never
reopened by name, so nobody who can write to the folder can redirect the bytes through a link swapped in
meanwhile (and a name swapped for another file is noticed before the rename). It gets the mode the target has,
or for a new file 0644 less the umask (readable by the node's user, never group- or world-writable; not
mkstemp's 0600), is flushed
to disk, and replaces the target in one rename: a reader (the node, TensorRT's builder, a resumed training run)
sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it back would, for a moment, make
    files other threads create world-writable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: the briefest and safest way there is
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return 0o644 & ~umask()
    return stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else 0o644 & ~umask()


@contextmanager
def replacing(target: str | Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A fresh, empty temporary file beside ``target``, open for binary writing; it replaces ``target`` when the
    block ends and is removed when the block raises (the target is then untouched). Creates the parent folder.
    ``mode``: the new file's permission bits as given (the umask is not applied); None = the target's, or for a new
    file 0644 less the umask."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _mode_for(target) if mode is None else mode)
            os.fsync(f.fileno())
            written = os.fstat(f.fileno())
        now = os.lstat(tmp)
        if (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):  # someone swapped the name meanwhile
            raise OSError(f"'{tmp}' was replaced by someone else while it was written; '{target}' left as it was")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
