"""Who may have written a cache file, checked before anything in ``engine_cache_dir`` is opened.

In the spirit of sshd's StrictModes: an engine is code that TensorRT runs and an fp16 ONNX file decides every
label, so a file in the cache is trusted only when nobody but the running user or root can have written it.

- The cache folder (and each folder made below it) must be owned by the running user or root and writable by
  no one else (no group or other write bit); every folder above it must be owned by the user or root and be
  either not writable by others or sticky (``/tmp``: others cannot rename or delete what is ours there).
  Otherwise the whole cache is refused with one line, before anything in it is read.
- A file is opened only when ``lstat`` says it is a regular file (not a FIFO, device, socket or symlink), owned
  by the user or root and not writable by group or others; it is then opened with ``O_NOFOLLOW | O_NONBLOCK``
  and ``fstat`` must show the same file, so a swap between the check and the open, or a FIFO, never blocks.
- Files are written to a fresh temporary name (``O_EXCL``, mode 0644 less the process umask) and renamed into
  place, so readers never see half a file and a cache built ahead by root is readable by the node's user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unet_perception.atomic_file import replacing, umask
from unet_perception.backends.base import BackendError

FOLDER_MODE = 0o755  # folders this package makes (less the umask): never group/other-writable
FILE_MODE = 0o644    # files this package writes (less the umask): readable by the node's user, writable by the owner
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UntrustedCache(BackendError):
    """The cache folder (or one above it) can be written by someone other than the user and root."""


class UntrustedFile(BackendError):
    """A file in the cache that is not opened: not a regular file, or not the user's or root's alone."""


def _trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _writers(mode: int) -> str:
    return "everyone" if mode & stat.S_IWOTH else "its group"


def folder_problem(st: os.stat_result, is_cache: bool) -> str:
    """Why a folder cannot be trusted ("" when it can); ``is_cache``: the cache itself (sticky is no excuse)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if not _trusted_uid(st.st_uid):
        return f"is owned by {_owner(st.st_uid)}, not by this user or root"
    if st.st_mode & OTHERS_WRITE and (is_cache or not st.st_mode & stat.S_ISVTX):
        return f"is writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def check_folder(folder: Path) -> Path:
    """The real path of ``folder`` when it and every folder above it pass the rules; else UntrustedCache."""
    real = Path(os.path.realpath(folder))
    for current in (real, *real.parents):
        problem = folder_problem(os.stat(current), current == real)
        if problem:
            where = f"engine cache folder '{real}'" if current == real else \
                f"folder '{current}' above engine cache folder '{real}'"
            raise UntrustedCache(f"{where} {problem}: a file planted there could run as an engine or model, so "
                                 "nothing in the cache is opened; make it writable only by its owner (chmod go-w) "
                                 "or set engine_cache_dir / --cache-dir to a folder of your own")
    return real


def make_folder(folder: Path) -> None:
    """Create ``folder`` and any missing parents with mode 0755 (less the umask), never group-writable."""
    missing = []
    current = Path(os.path.abspath(folder))
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, FOLDER_MODE)
        except FileExistsError:  # another process made it meanwhile: check_folder judges it
            pass


def cache_folder(folder: Path) -> Path:
    """``folder`` created when missing and checked (``check_folder``); OSError becomes one BackendError line."""
    try:
        make_folder(folder)
        return check_folder(folder)
    except OSError as exc:
        raise BackendError(f"cannot use engine cache folder '{folder}': {exc.strerror or exc}") from exc


def require_writable(folder: Path, what: str) -> None:
    """BackendError before any work when ``what`` could not be stored in the (trusted) cache ``folder``."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackendError(f"{what} cannot be stored: engine cache folder '{folder}' (owned by "
                           f"{_owner(os.stat(folder).st_uid)}) is not writable by {_owner(os.geteuid())}; make it "
                           "there as the folder's owner (unet-build-engine --cache-dir, with the same options) or "
                           "set engine_cache_dir / --cache-dir to a folder of your own")


def file_problem(st: os.stat_result) -> str:
    """Why a cache file is never opened ("" when it may be)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink"
    if not stat.S_ISREG(st.st_mode):
        kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                 stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a folder"}
        return "is " + next((name for test, name in kinds.items() if test(st.st_mode)), "not a regular file")
    if not _trusted_uid(st.st_uid):
        return f"is owned by {_owner(st.st_uid)}, not by this user or root"
    if st.st_mode & OTHERS_WRITE:
        return f"is writable by {_writers(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def read_trusted(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a trusted cache file; FileNotFoundError when it is absent, UntrustedFile saying why not."""
    st = os.lstat(path)
    problem = file_problem(st)
    if problem:
        raise UntrustedFile(f"'{path}' {problem}; not opened")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino) or file_problem(now):
            raise UntrustedFile(f"'{path}' was replaced while it was being opened; not read")
        if max_bytes is not None and now.st_size > max_bytes:
            raise UntrustedFile(f"'{path}' has {now.st_size} bytes, more than the {max_bytes} it may have")
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write through ``atomic_file.replacing`` into a folder made by ``make_folder``, mode 0644 less the umask
    whatever the file had (never group-writable, which the trust check would refuse on reading).

    Readers never see half a file; a crash leaves at most a ``.<name>.<random>.tmp`` file, never a half engine.
    """
    make_folder(path.parent)
    with replacing(path, mode=FILE_MODE & ~umask()) as f:
        f.write(data)
