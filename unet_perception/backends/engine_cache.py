"""The TensorRT engine cache: one key per engine, a JSON sidecar describing it, atomic writes.

An engine is tied to the exact ONNX file it was built from (the per-precision file: fp32, the fp16 conversion
or the int8 Q/DQ model), the GPU model, the TensorRT version, the precision and the optimisation profile. All of
them go into the key; the engine is stored as ``<cache_dir>/<key>.engine`` with a ``<key>.json`` sidecar listing
the fields, so a change to any of them means a different key and a fresh build, never a "version tag does not
match" at load time. This module is the only reader and writer of sidecars.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import PRECISIONS


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


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's fields, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def built_with(engine: Path) -> str:
    """The TensorRT version an engine's sidecar records ("?" when unknown): for error messages."""
    found = read_sidecar(engine.with_suffix(".json")) or {}
    return str(found.get("tensorrt_version", "?"))


def plan_engine(cache_dir: Path, key: EngineKey) -> CachePlan:
    """Load only when both files exist and the sidecar's fields equal the key's; otherwise build, saying why."""
    engine, sidecar = engine_paths(cache_dir, key)
    wanted = key.fields()
    if engine.is_file():
        found = read_sidecar(sidecar)
        if found is None:
            return CachePlan("build", engine, sidecar, f"cached engine '{engine}' has no readable sidecar")
        differ = [f"{k} {found.get(k)!r} != {v!r}" for k, v in wanted.items() if found.get(k) != v]
        if not differ:
            return CachePlan("load", engine, sidecar, f"cached engine '{engine}' matches")
        return CachePlan("build", engine, sidecar, "cached engine's key fields differ: " + ", ".join(differ))
    # Say what changed since the last engine built from this same ONNX file, when there is one.
    for other in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        found = read_sidecar(other)
        if found and found.get("onnx_sha256") == key.onnx_sha256:
            differ = [f"{k} {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v]
            return CachePlan("build", engine, sidecar,
                             f"no cached engine for this key; the one for this model ({other.stem}) differs in "
                             + ", ".join(differ))
    return CachePlan("build", engine, sidecar, f"no cached engine in '{cache_dir}' for this model")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store_engine(plan: CachePlan, key: EngineKey, engine: bytes, build_s: float) -> None:
    """Engine first, sidecar last: a sidecar only ever describes a complete engine."""
    atomic_write(plan.engine, engine)
    atomic_write(plan.sidecar, json.dumps({**key.fields(), "build_seconds": round(build_s, 1),
                                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1).encode())
