"""The TensorRT engine cache: one key per engine, a JSON sidecar describing it, atomic writes.

An engine is tied to the exact ONNX file it was built from (the per-precision file: fp32, the fp16 conversion
or the int8 Q/DQ model), the GPU model, the TensorRT version, the precision and the optimisation profile. All of
them go into the key; the engine is stored as ``<cache_dir>/<key>.engine`` with a ``<key>.json`` sidecar listing
the fields and the engine's sha256, so a change to any of them means a different key and a fresh build, never a
"version tag does not match" at load time. This module is the only reader and writer of sidecars; every file in
the cache is read through ``cache_trust`` (who may have written it) and an engine's bytes are checked against
the sha256 in its sidecar before they reach TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unet_perception.backends.base import BackendError
from unet_perception.backends.cache_trust import UntrustedFile, atomic_write, read_trusted
from unet_perception.backends.factory import PRECISIONS

__all__ = ["atomic_write"]  # re-exported: the fleet plan writes through it too
SIDECAR_MAX_BYTES = 1 << 16


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unet_perception/engines`` (``~/.cache/...``): writable wherever the model lives."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unet_perception" / "engines"


def cache_dir_for(engine_cache_dir: str) -> Path:
    """The cache folder an ``engine_cache_dir`` option names ("" = the default)."""
    return Path(engine_cache_dir).expanduser() if engine_cache_dir else default_cache_dir()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def profile_shapes(input_hw: tuple[int, int], max_batch: int) -> dict[str, list[int]]:
    """The one optimisation profile: batch 1..max_batch, tuned for max_batch (the batcher's busy case)."""
    h, w = input_hw
    return {"min": [1, h, w, 3], "opt": [max_batch, h, w, 3], "max": [max_batch, h, w, 3]}


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any change gives another key and so another engine file."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profile: tuple[tuple[int, ...], ...]  # min, opt, max shapes of the input

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:32]

    def fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["profile"] = [list(shape) for shape in self.profile]
        return fields


def make_key(onnx_path: str | Path, input_hw: tuple[int, int], precision: str, max_batch: int,
             gpu_name: str, compute_capability: tuple[int, int], tensorrt_version: str) -> EngineKey:
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    shapes = profile_shapes(input_hw, max_batch)
    capability = f"{compute_capability[0]}.{compute_capability[1]}"
    return EngineKey(file_sha256(onnx_path), gpu_name, capability, tensorrt_version,
                     precision, tuple(tuple(shapes[k]) for k in ("min", "opt", "max")))


@dataclass(frozen=True)
class CachePlan:
    """What to do for a key: ``load`` the cached engine or ``build`` one, and why."""

    action: str
    engine: Path
    sidecar: Path
    reason: str


def engine_paths(cache_dir: Path, key: EngineKey) -> tuple[Path, Path]:
    return cache_dir / f"{key.digest}.engine", cache_dir / f"{key.digest}.json"


def load_sidecar(path: Path) -> dict[str, Any]:
    """A sidecar's fields, read through ``cache_trust``; OSError, UntrustedFile or ValueError saying what is wrong."""
    data = json.loads(read_trusted(path, SIDECAR_MAX_BYTES))
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' is not a JSON object")
    return data


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's fields, or None when it is missing, not trusted or not a JSON object."""
    try:
        return load_sidecar(path)
    except (OSError, ValueError, UntrustedFile):
        return None


def built_with(engine: Path) -> str:
    """The TensorRT version an engine's sidecar records ("?" when unknown): for error messages."""
    found = read_sidecar(engine.with_suffix(".json")) or {}
    return str(found.get("tensorrt_version", "?"))


def checked_bytes(path: Path, sidecar: Path, field: str) -> bytes:
    """The bytes of a cache file whose sha256 equals ``field`` of its sidecar; BackendError saying why not.

    The bytes returned are the bytes hashed: nothing re-reads the file between the check and its use.
    """
    try:
        fields = load_sidecar(sidecar)
        data = read_trusted(path)
    except UntrustedFile:
        raise
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read cache file '{path}' or its sidecar: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != fields.get(field):
        raise BackendError(f"'{path}' does not match the sha256 its sidecar '{sidecar.name}' records ({field}); "
                           "it was changed or replaced after it was written, so it is not used")
    return data


def read_engine(engine: Path) -> bytes:
    """The engine's bytes, checked against its sidecar's sha256: what goes to ``deserialize_cuda_engine``."""
    return checked_bytes(engine, engine.with_suffix(".json"), "engine_sha256")


def plan_engine(cache_dir: Path, key: EngineKey) -> CachePlan:
    """Load only when both files are trusted, the sidecar's fields equal the key's and the engine's sha256 is the
    sidecar's; otherwise build, saying why. Nothing untrusted is opened (``cache_trust``)."""
    engine, sidecar = engine_paths(cache_dir, key)
    wanted = key.fields()
    if os.path.lexists(engine):
        try:
            found = load_sidecar(sidecar)
        except (OSError, ValueError, UntrustedFile) as exc:
            return CachePlan("build", engine, sidecar, f"cached engine '{engine}' has no usable sidecar ({exc})")
        differ = [f"{k} {found.get(k)!r} != {v!r}" for k, v in wanted.items() if found.get(k) != v]
        if differ:
            return CachePlan("build", engine, sidecar, "cached engine's key fields differ: " + ", ".join(differ))
        try:
            read_engine(engine)
        except BackendError as exc:
            return CachePlan("build", engine, sidecar, str(exc))
        return CachePlan("load", engine, sidecar, f"cached engine '{engine}' matches")
    # Say what changed since the last engine built from this same ONNX file, when there is one.
    for other in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        last = read_sidecar(other)
        if last and last.get("onnx_sha256") == key.onnx_sha256:
            differ = [f"{k} {last.get(k)!r} -> {v!r}" for k, v in wanted.items() if last.get(k) != v]
            return CachePlan("build", engine, sidecar,
                             f"no cached engine for this key; the one for this model ({other.stem}) differs in "
                             + ", ".join(differ))
    return CachePlan("build", engine, sidecar, f"no cached engine in '{cache_dir}' for this model")


def store_engine(plan: CachePlan, key: EngineKey, engine: bytes, build_s: float) -> None:
    """Engine first, sidecar last: a sidecar only ever describes a complete engine."""
    atomic_write(plan.engine, engine)
    atomic_write(plan.sidecar, json.dumps({**key.fields(), "engine_sha256": hashlib.sha256(engine).hexdigest(),
                                           "build_seconds": round(build_s, 1),
                                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1).encode())
