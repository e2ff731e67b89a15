"""Files that appear whole or not at all: written under a fresh temporary name beside the target, then renamed.

The temporary name is made by ``tempfile.mkstemp`` (O_EXCL: never an existing file or a link someone planted, and
two runs writing the same target never share it); the file gets the mode an ordinary ``open`` would give (0644
less the umask, not mkstemp's 0600) and replaces the target in one rename, so a reader (the node, TensorRT's
builder, a resumed training run) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def umask() -> int:
    """The process's umask (read by setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing(target: str | Path) -> Iterator[Path]:
    """A fresh, empty temporary path beside ``target`` to write to; renamed onto ``target`` when the block ends,
    removed when it raises (the target is then untouched). Creates the parent folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644 & ~umask())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
