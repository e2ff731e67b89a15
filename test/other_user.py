"""A second user for the cache trust tests, and a way to run code as it (or to run code that might hang).

The user is created with ``useradd`` when the tests run as root; otherwise the tests that need it skip, saying
so. Code runs as that user in a forked child that drops to its uid and gid (what ``preexec_fn`` with setuid
does), not in a new interpreter: the interpreter may sit where another user cannot read it (here under
/root/.pyenv), so everything the code needs must be imported before ``run_as`` is called.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

OTHER_USER = "unet-cache-other"


def other_user() -> tuple[int, int]:
    """The second user's (uid, gid), creating it when needed; skips unless running as root with useradd."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test creates a second user (useradd) and runs code as it")
    try:
        entry = pwd.getpwnam(OTHER_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            pytest.skip("running as root but there is no useradd to create a second user")
        done = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                              capture_output=True, text=True, check=False)
        try:
            entry = pwd.getpwnam(OTHER_USER)
        except KeyError:
            pytest.skip(f"useradd {OTHER_USER} failed: {done.stderr.strip()}")
    return entry.pw_uid, entry.pw_gid


def run_as(user: tuple[int, int] | None, fn: Callable[[], Any], timeout: float = 60.0) -> dict[str, Any]:
    """``{"ok": fn()}`` or ``{"error": "Type: message"}`` from a child running as ``user`` (None: this user) with
    umask 022; ``{"hung": True}`` when it ran past ``timeout`` (it is killed). The result must be JSON-able."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.umask(0o022)
            if user is not None:
                os.setgroups([])
                os.setgid(user[1])
                os.setuid(user[0])
            try:
                out: dict[str, Any] = {"ok": fn()}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which asserts on it
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write_end, json.dumps(out, default=str).encode()[:60000])
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"hung": True}
            time.sleep(0.05)
        data = b""
        while chunk := os.read(read_end, 1 << 16):
            data += chunk
    finally:
        os.close(read_end)
    return json.loads(data) if data else {"error": "the child died without a result"}
