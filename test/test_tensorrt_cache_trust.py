"""Who may write the engine cache (docs/tensorrt.md): folders others can write are refused with one line, files
that are not the user's or root's regular files are never opened (a FIFO never blocks), engines and fp16 files
are checked against their sidecar's sha256, and a cache built by root is used by another user.

The engine path runs through the fake TensorRT (what reaches ``deserialize_cuda_engine`` is recorded); the fp16
path runs for real on the CPU through ONNX Runtime. Tests with a second user need root (they create it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_tiny_model
from fake_tensorrt import FakeBuilder, FakeEngine, HostCuda, fake_tensorrt
from other_user import other_user, run_as

from unet_perception.backends import engine_cache as ec
from unet_perception.backends import precision_onnx as po
from unet_perception.backends import tensorrt_builder as tb
from unet_perception.backends.base import BackendError
from unet_perception.backends.cache_trust import UntrustedCache, cache_folder
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.backends.tensorrt import TensorRTBackend
from unet_perception.launch_support import node_command, node_env
from unet_perception.model_contract import read_model_info
from unet_perception.tools import build_engine

VERSION = "10.13.0.35"
FRAMES = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can enter (tmp_path is root's 0700), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="unet-cache-trust-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    cuda = HostCuda()
    trt = fake_tensorrt(FakeEngine(cuda, (32, 48), 4))
    trt.host_cuda = cuda  # type: ignore[attr-defined]  # the memory the fake engine runs on
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def copy_model(model: Path, folder: Path) -> Path:
    out = folder / "m.onnx"
    out.write_bytes(model.read_bytes())
    os.chmod(out, 0o644)
    return out


def public_key(model: Path, precision: str = "fp32", max_batch: int = 4) -> ec.EngineKey:
    """The key anyone can derive: model sha256, GPU name, TensorRT version, precision, profile."""
    return ec.make_key(model, (32, 48), precision, max_batch, HostCuda().name, (9, 0), VERSION)


def plant_engine(model: Path, cache: Path) -> str:
    key = public_key(model)
    plan = ec.plan_engine(cache, key)
    ec.store_engine(plan, key, b"serialized-engine:planted", 1.0)
    return str(plan.engine)


def trt_backend(model: Path, cache: Path, builder: FakeBuilder, logs: list[str]) -> TensorRTBackend:
    options = BackendOptions(max_batch=4, device="cuda", engine_cache_dir=str(cache))
    cuda = sys.modules["tensorrt"].host_cuda  # type: ignore[attr-defined]
    return TensorRTBackend(read_model_info(model), options, cuda=cuda, builder=builder, log=logs.append)


def fp16_backend(model: Path, cache: Path) -> Any:
    return create_backend("onnxruntime", model, BackendOptions(max_batch=4, precision="fp16", threads=1,
                                                               engine_cache_dir=str(cache)))


def reference_labels(model: Path | bytes) -> np.ndarray:
    """ONNX Runtime on the model file itself (fp32): the labels an fp16 conversion of it must nearly match."""
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(["labels"], {"image": FRAMES})[0]


# --- folders ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, who", [(0o777, "everyone"), (0o775, "its group"), (0o1777, "everyone")])
def test_a_cache_folder_others_can_write_is_refused_with_one_line(tiny_model: Path, tmp_path: Path, fake_trt: Any,
                                                                 mode: int, who: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, mode)
    plant_engine(tiny_model, cache)  # a complete engine + sidecar with every field right: still never read
    builder, logs = FakeBuilder(), list[str]()
    with pytest.raises(UntrustedCache) as refused:
        trt_backend(tiny_model, cache, builder, logs).activate()
    line = str(refused.value)
    assert "\n" not in line and f"engine cache folder '{cache}' is writable by {who} (mode {mode:04o})" in line
    assert "deserialized" not in fake_trt.built and builder.builds == []
    with pytest.raises(BackendError, match=f"'{cache}' is writable by {who}"):  # the fp16 file on the CPU too
        fp16_backend(tiny_model, cache).activate()
    assert not (cache / "onnx").exists()


def test_folders_above_the_cache_must_not_let_others_swap_it(tmp_path: Path) -> None:
    above = tmp_path / "shared"
    above.mkdir()
    os.chmod(above, 0o777)  # anyone could rename our cache folder away and put theirs in its place
    with pytest.raises(UntrustedCache, match=f"folder '{above}' above engine cache folder '{above}/cache' is "
                                             "writable by everyone"):
        cache_folder(above / "cache")
    os.chmod(above, 0o1777)  # sticky, like /tmp: others cannot rename what is ours
    assert cache_folder(above / "cache") == above / "cache"
    assert stat.S_IMODE((above / "cache").stat().st_mode) & 0o022 == 0


# --- files that are not regular files ----------------------------------------------------------------------------

def test_fifos_devices_and_symlinks_in_the_cache_never_block_and_are_never_opened(tiny_model: Path, tmp_path: Path,
                                                                                  fake_trt: Any) -> None:
    """A FIFO named zzz.json used to hang start-up and unet-build-engine forever."""
    cache = tmp_path / "cache"
    cache.mkdir()
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    os.mkfifo(cache / "zzz.json")
    (cache / "yyy.json").symlink_to("/dev/zero")
    (cache / "xxx.json").symlink_to(outside)
    if os.geteuid() == 0:
        os.mknod(cache / "www.json", 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero itself
    info = read_model_info(tiny_model)
    options = BackendOptions(device="cuda", engine_cache_dir=str(cache))

    def build(builder: FakeBuilder | None) -> list[str]:
        logs: list[str] = []
        path, _ = tb.engine_for(info, options, HostCuda(), logs.append, VERSION, builder)
        return [path.read_text(), *logs]

    first = run_as(None, lambda: build(FakeBuilder()), timeout=60)
    assert first.get("ok", [""])[0] == "serialized-engine:fp32", first  # {"hung": True} when an open blocked
    # Now the engine a FIFO, its sidecar a symlink to a good copy outside, the timing cache a FIFO.
    engine, sidecar = ec.engine_paths(cache, public_key(tiny_model))
    good = tmp_path / "good.json"
    good.write_bytes(sidecar.read_bytes())
    engine.unlink()
    os.mkfifo(engine)
    sidecar.unlink()
    sidecar.symlink_to(good)
    timing = cache / "timing-0.cache"
    os.mkfifo(timing)
    settings = tb.BuildSettings(tiny_model, (32, 48), "fp32", 4, 256, timing)
    again = run_as(None, lambda: build(None) + [tb.read_timing_cache(settings.timing_cache, print).decode()],
                   timeout=60)
    assert "ok" in again, again
    text, *logs, timing_read = again["ok"]
    assert text == "plan" and timing_read == ""  # the real build path (fake TensorRT), the FIFO not read
    assert any("has no usable sidecar" in line and "is a symlink; not opened" in line for line in logs)
    assert stat.S_ISREG(os.lstat(engine).st_mode) and stat.S_ISREG(os.lstat(sidecar).st_mode)
    assert stat.S_ISFIFO(os.lstat(cache / "zzz.json").st_mode)  # refused files are left for their owner to see


# --- planted files, with a second user -------------------------------------------------------------------------

def test_an_engine_planted_by_another_user_never_reaches_tensorrt(tiny_model: Path, shared: Path,
                                                                  fake_trt: Any) -> None:
    other = other_user()
    model = copy_model(tiny_model, shared)
    cache = shared / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)  # a cache folder shared by everyone, as in the report
    planted = run_as(other, lambda: plant_engine(model, cache))
    assert "ok" in planted, planted
    builder, logs = FakeBuilder(), list[str]()
    with pytest.raises(UntrustedCache, match="is writable by everyone"):
        trt_backend(model, cache, builder, logs).activate()
    os.chown(cache, other[0], other[1])
    os.chmod(cache, 0o755)
    with pytest.raises(UntrustedCache, match=r"is owned by uid \d+ \(unet-cache-other\), not by this user or root"):
        trt_backend(model, cache, builder, logs).activate()
    assert "deserialized" not in fake_trt.built and builder.builds == []
    # The folder is root's again, the planted files still the other user's: never opened, built afresh.
    os.chown(cache, 0, 0)
    with trt_backend(model, cache, builder, logs) as backend:
        assert backend.infer(FRAMES[:2]).labels.shape == (2, 32, 48)
    assert fake_trt.built["deserialized"] == [b"serialized-engine:fp32"] and len(builder.builds) == 1
    assert any("no usable sidecar" in line and "owned by uid" in line for line in logs)
    assert os.stat(planted["ok"]).st_uid == 0


def test_a_planted_fp16_file_is_never_used(tiny_model: Path, shared: Path, tmp_path: Path) -> None:
    """The report: an fp16 file made from another model was used by precision fp16 (3% of labels agreed)."""
    other = other_user()
    model = copy_model(tiny_model, shared)
    foreign = po.convert_to_fp16(onnx.load(str(make_tiny_model(tmp_path / "other.onnx", seed=1))))
    planted_bytes = foreign.SerializeToString()
    truth = reference_labels(model)
    assert (reference_labels(planted_bytes) == truth).mean() < 0.5  # the planted model is visibly another model
    cache = shared / "cache"
    (cache / "onnx").mkdir(parents=True)
    os.chmod(cache / "onnx", 0o777)
    source = hashlib.sha256(model.read_bytes()).hexdigest()
    target = cache / "onnx" / f"{source[:24]}-fp16-occ{po.converter_version()}.onnx"

    def plant() -> None:  # the file and a sidecar whose every field is right for it
        target.write_bytes(planted_bytes)
        target.with_suffix(".json").write_text(json.dumps({"source_sha256": source, "fp16_sha256": hashlib.sha256(
            planted_bytes).hexdigest()}))

    assert "ok" in run_as(other, plant)
    with pytest.raises(BackendError, match=f"engine cache folder '{cache}/onnx' is writable by everyone"):
        fp16_backend(model, cache).activate()
    os.chmod(cache / "onnx", 0o755)
    with fp16_backend(model, cache) as backend:
        labels = backend.infer(FRAMES).labels
    assert (labels == truth).mean() >= 0.99  # the model's own conversion, not the planted one
    assert os.stat(target).st_uid == 0 and hashlib.sha256(target.read_bytes()).hexdigest() != hashlib.sha256(
        planted_bytes).hexdigest()
    # Root's own folder, a file with the right name but other bytes (copied in, swapped): its sha256 gives it away.
    target.write_bytes(planted_bytes)
    with fp16_backend(model, cache) as backend:
        assert (backend.infer(FRAMES).labels == truth).mean() >= 0.99


def test_a_cache_built_by_root_is_used_by_another_user(tiny_model: Path, shared: Path, fake_trt: Any) -> None:
    """Built ahead as root (a container image), run as the node's user: loaded, no rebuild, no PermissionError."""
    other = other_user()
    model = copy_model(tiny_model, shared)
    cache = shared / "cache"  # made by the code, as root, under the usual umask
    info = read_model_info(model)
    options = BackendOptions(max_batch=4, device="cuda", engine_cache_dir=str(cache))
    old = os.umask(0o022)
    try:
        root_engine, _ = tb.engine_for(info, options, HostCuda(), print, VERSION, FakeBuilder())
        with fp16_backend(model, cache) as backend:
            root_labels = backend.infer(FRAMES).labels
    finally:
        os.umask(old)

    def as_other_user() -> dict[str, Any]:
        logs: list[str] = []
        path, _ = tb.engine_for(info, options, HostCuda(), logs.append, VERSION, FakeBuilder(fail=True))
        with fp16_backend(model, cache) as backend:
            labels = backend.infer(FRAMES).labels
        return {"path": str(path), "engine": ec.read_engine(path).decode(), "logs": logs,
                "same_labels": bool((labels == root_labels).all())}

    result = run_as(other, as_other_user)
    assert "ok" in result, result
    assert result["ok"]["path"] == str(root_engine) and result["ok"]["engine"] == "serialized-engine:fp32"
    assert result["ok"]["same_labels"] and any("using cached engine" in line for line in result["ok"]["logs"])
    # An engine the other user would have to build there (another max_batch): one line before any build.
    other_batch = BackendOptions(max_batch=2, device="cuda", engine_cache_dir=str(cache))
    refused = run_as(other, lambda: tb.engine_for(info, other_batch, HostCuda(), print, VERSION,
                                                  FakeBuilder(fail=True)))
    assert refused.get("error", "").startswith("BackendError: a fp32 engine for 'm.onnx'"), refused
    assert "is not writable by uid" in refused["error"] and "failed to build" not in refused["error"]


# --- end to end: unet-build-engine and the node ----------------------------------------------------------------

def test_unet_build_engine_finishes_with_a_fifo_in_the_cache_and_refuses_a_shared_one(
        tiny_model: Path, tmp_path: Path, fake_trt: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cuda = fake_trt.host_cuda
    monkeypatch.setattr("unet_perception.backends.tensorrt_builder.load_cuda", lambda: cuda)
    monkeypatch.setattr("unet_perception.backends.tensorrt.load_cuda", lambda: cuda)
    monkeypatch.setattr("unet_perception.backends.tensorrt_builder.build_serialized_engine", FakeBuilder())
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "zzz.json")
    args = [str(tiny_model), "--max-batch", "4", "--cache-dir", str(cache)]
    done = run_as(None, lambda: build_engine.main(args), timeout=60)
    assert done == {"ok": 0}, done  # it used to hang here forever
    os.chmod(cache, 0o777)
    assert build_engine.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: engine cache folder '{cache}' is writable by everyone")


def test_the_node_refuses_a_shared_cache_with_one_fatal_line(tiny_model: Path, tmp_path: Path) -> None:
    """precision fp16 on the CPU: the fp16 file would come from the shared folder."""
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    params_file = tmp_path / "params.yaml"
    params_file.write_text("/**:\n  ros__parameters:\n    image_topics: [cli/image_raw]\n")
    params = {"model_path": str(tiny_model), "precision": "fp16", "engine_cache_dir": str(cache)}
    result = subprocess.run(node_command(params_file, params), env=os.environ | node_env(), capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    fatal = [line for line in result.stderr.splitlines() if "[FATAL]" in line]
    assert result.returncode == 1 and len(fatal) == 1, result.stderr
    assert f"engine cache folder '{cache}' is writable by everyone (mode 0777)" in fatal[0]
    assert "Traceback" not in result.stderr and not (cache / "onnx").exists()
