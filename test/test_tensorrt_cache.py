"""The engine cache without TensorRT: key fields, load-or-build decisions and why, sidecars with the engine's
sha256, atomic writes with the umask (who may write the cache: test_tensorrt_cache_trust.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from unet_perception.backends import engine_cache as ec
from unet_perception.backends.base import BackendError

KEY_ARGS = dict(input_hw=(32, 48), precision="fp16", max_batch=4, gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability=(9, 0), tensorrt_version="10.13.0.35")


def test_key_changes_with_every_field(tiny_model: Path, tmp_path: Path) -> None:
    base = ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    assert base == ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    assert base.profile == ((1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3))
    other_onnx = tmp_path / "other.onnx"
    other_onnx.write_bytes(tiny_model.read_bytes() + b"\0")
    variants = {
        "onnx_sha256": ec.make_key(other_onnx, **KEY_ARGS),  # type: ignore[arg-type]
        "gpu_name": ec.make_key(tiny_model, **{**KEY_ARGS, "gpu_name": "NVIDIA GeForce RTX 5090"}),  # type: ignore[arg-type]
        "compute_capability": ec.make_key(tiny_model, **{**KEY_ARGS, "compute_capability": (12, 0)}),  # type: ignore[arg-type]
        "tensorrt_version": ec.make_key(tiny_model, **{**KEY_ARGS, "tensorrt_version": "11.4.0.1"}),  # type: ignore[arg-type]
        "precision": ec.make_key(tiny_model, **{**KEY_ARGS, "precision": "int8"}),  # type: ignore[arg-type]
        "profile": ec.make_key(tiny_model, **{**KEY_ARGS, "max_batch": 2}),  # type: ignore[arg-type]
    }
    digests = {base.digest} | {key.digest for key in variants.values()}
    assert len(digests) == 1 + len(variants)
    for field, key in variants.items():
        changed = [k for k, v in key.fields().items() if v != base.fields()[k]]
        assert changed == [field]


@pytest.mark.parametrize("other", ["10.14.0.35", "10.13.1.35", "10.13.0.36"])
def test_key_differs_when_only_the_tensorrt_minor_or_patch_differs(tiny_model: Path, other: str) -> None:
    """An engine from 10.13 must never be handed to 10.14 (or to another patch or build of 10.13)."""
    base = ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    key = ec.make_key(tiny_model, **{**KEY_ARGS, "tensorrt_version": other})  # type: ignore[arg-type]
    assert key.digest != base.digest and ec.engine_paths(Path("c"), key) != ec.engine_paths(Path("c"), base)
    assert key.fields()["tensorrt_version"] == other


def test_key_rejects_unknown_precision(tiny_model: Path) -> None:
    with pytest.raises(BackendError, match="precision must be one of"):
        ec.make_key(tiny_model, **{**KEY_ARGS, "precision": "fp8"})  # type: ignore[arg-type]


def test_plan_builds_then_loads_and_says_what_changed(tiny_model: Path, tmp_path: Path) -> None:
    key = ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    plan = ec.plan_engine(tmp_path, key)
    assert (plan.action, plan.engine.name) == ("build", f"{key.digest}.engine")
    assert "no cached engine" in plan.reason
    ec.store_engine(plan, key, b"engine-bytes", 1.0)
    assert ec.plan_engine(tmp_path, key).action == "load"
    assert ec.built_with(plan.engine) == "10.13.0.35"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing

    upgraded = replace(key, tensorrt_version="11.4.0.1")
    plan2 = ec.plan_engine(tmp_path, upgraded)
    assert plan2.action == "build" and plan2.engine != plan.engine
    assert "tensorrt_version '10.13.0.35' -> '11.4.0.1'" in plan2.reason


def test_plan_never_loads_an_engine_whose_sidecar_disagrees(tiny_model: Path, tmp_path: Path) -> None:
    key = ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    plan = ec.plan_engine(tmp_path, key)
    ec.store_engine(plan, key, b"engine-bytes", 1.0)
    sidecar = json.loads(plan.sidecar.read_text())
    plan.sidecar.write_text(json.dumps({**sidecar, "precision": "fp32"}))
    tampered = ec.plan_engine(tmp_path, key)
    assert tampered.action == "build" and "precision 'fp32' != 'fp16'" in tampered.reason
    plan.sidecar.write_text("not json")
    assert "no usable sidecar" in ec.plan_engine(tmp_path, key).reason
    assert ec.built_with(plan.engine) == "?"
    plan.sidecar.unlink()
    assert ec.plan_engine(tmp_path, key).action == "build"


def test_an_engine_that_is_not_the_one_its_sidecar_describes_is_rebuilt(tiny_model: Path, tmp_path: Path) -> None:
    """Right fields, wrong bytes (a swapped or truncated engine): never loaded, never handed to TensorRT."""
    key = ec.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    plan = ec.plan_engine(tmp_path, key)
    ec.store_engine(plan, key, b"engine-bytes", 1.0)
    assert json.loads(plan.sidecar.read_text())["engine_sha256"] == hashlib.sha256(b"engine-bytes").hexdigest()
    assert ec.read_engine(plan.engine) == b"engine-bytes"
    plan.engine.write_bytes(b"planted-engine")
    again = ec.plan_engine(tmp_path, key)
    assert again.action == "build" and "does not match the sha256" in again.reason
    with pytest.raises(BackendError, match="does not match the sha256 its sidecar"):
        ec.read_engine(plan.engine)


def test_cache_files_are_written_with_the_umask(tmp_path: Path) -> None:
    """0644 under the usual umask 022 (mkstemp's 0600 made a cache built by root unreadable by the node's user)."""
    old = os.umask(0o022)
    try:
        ec.atomic_write(tmp_path / "a" / "b.engine", b"x")
        os.umask(0o077)
        ec.atomic_write(tmp_path / "a" / "c.engine", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "b.engine").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "c.engine").stat().st_mode) == 0o600


def test_cache_files_lose_a_group_write_bit_they_had(tmp_path: Path) -> None:
    """A cache file someone made group-writable (which read_trusted refuses) is rewritten 0644 less the umask,
    not with the mode it had (atomic_file.replacing's default for other files)."""
    target = tmp_path / "a" / "b.engine"
    ec.atomic_write(target, b"old")
    target.chmod(0o664)
    old = os.umask(0o022)
    try:
        ec.atomic_write(target, b"new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_bytes() == b"new"


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.engine"
    ec.atomic_write(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ec.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ec.atomic_write(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.engine"]


def test_cache_dir_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ec.cache_dir_for("") == tmp_path / "unet_perception" / "engines"
    assert ec.cache_dir_for("~/engines") == Path.home() / "engines"
