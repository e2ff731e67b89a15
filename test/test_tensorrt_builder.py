"""The engine builder without TensorRT: one strongly typed path for TensorRT 10.x and 11.x (through a fake
``tensorrt`` module that drops what 11.x removed), TF32 off for fp32, the per-precision ONNX file each build gets,
the graph rules checked before a build, and construction failures turned into BackendError with TensorRT's reason.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from fake_tensorrt import FakeBuilder, HostCuda, fake_tensorrt
from onnx import TensorProto, helper
from qdq import make_qdq_model

from unet_perception.backends import tensorrt_builder as tb
from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import BackendOptions
from unet_perception.model_contract import read_model_info

VERSION = "10.13.0.35"


def settings(tmp_path: Path, model: Path, precision: str = "fp32") -> tb.BuildSettings:
    return tb.BuildSettings(model, (32, 48), precision, 4, 256, tmp_path / "timing.cache")


@pytest.mark.parametrize("version, flags", [("10.13.0.35", 1 << 1), ("11.4.0.1", 1 << 0)])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_one_strongly_typed_path_for_10_and_11(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               version: str, flags: int, precision: str) -> None:
    """No FP16/INT8 flag, calibrator or platform_has_fast_fp16 (the 11.x fake raises on them); TF32 off for fp32."""
    trt = fake_tensorrt(version=version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    logs: list[str] = []
    plan = tb.build_serialized_engine(settings(tmp_path, tiny_model, precision), HostCuda(), logs.append)
    built = trt.built  # type: ignore[attr-defined]
    assert plan == b"plan" and built["parsed"] == str(tiny_model)
    assert built["parsers_at_build"] == 1  # the parser owns the weights the network points at: alive at the build
    assert built["network_flags"] == flags  # STRONGLY_TYPED by name: 1 on 10.x, 0 on 11.x (no EXPLICIT_BATCH)
    config = built["config"]
    assert config.flags == (set() if precision == "fp32" else {"TF32"})
    assert config.cleared == (["TF32"] if precision == "fp32" else [])
    assert config.workspace == 256 << 20 and len(config.profiles) == 1
    shapes = config.profiles[0].shapes["image"]
    assert shapes == ((1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3))
    assert (tmp_path / "timing.cache").read_bytes() == b"timing:"


def test_a_saved_timing_cache_tensorrt_refuses_is_replaced_by_a_new_one(tiny_model: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_tensorrt(version="11.4.0.1", timing_accepts="new")  # set_timing_cache(saved) returns False
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    (tmp_path / "timing.cache").write_bytes(b"from another GPU")
    logs: list[str] = []
    assert tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), logs.append) == b"plan"
    assert any("is unreadable or from another GPU or TensorRT; starting a new one" in line for line in logs)
    assert (tmp_path / "timing.cache").read_bytes() == b"timing:"  # the new cache, saved after the build


def test_a_saved_timing_cache_tensorrt_cannot_read_is_replaced_by_a_new_one(tiny_model: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """create_timing_cache returns None for bytes it cannot read (a truncated file): a new cache, not a TypeError
    from set_timing_cache(None) that stopped the build."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="10.3.0", timing_accepts="unreadable"))
    (tmp_path / "timing.cache").write_bytes(b"truncated")
    logs: list[str] = []
    assert tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), logs.append) == b"plan"
    assert any("is unreadable or from another GPU or TensorRT; starting a new one" in line for line in logs)
    assert (tmp_path / "timing.cache").read_bytes() == b"timing:"


def test_a_build_goes_on_without_a_timing_cache_when_tensorrt_refuses_every_one(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_timing_cache returns bool: when even a new cache is refused, say so and build without one."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="11.4.0.1", timing_accepts="none"))
    logs: list[str] = []
    assert tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), logs.append) == b"plan"
    assert any("set_timing_cache returned False" in line and "building without one" in line for line in logs)
    assert not (tmp_path / "timing.cache").exists()


def test_a_tensorrt_without_the_tf32_flag_still_builds(tiny_model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_tensorrt(version="11.4.0.1")
    del trt.BuilderFlag.TF32  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    logs: list[str] = []
    assert tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), logs.append) == b"plan"
    assert any("no BuilderFlag.TF32" in line for line in logs)


def test_builder_construction_failure_names_the_reason(tiny_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pybind raises TypeError when createInferBuilder returns null; TensorRT's logged error says why."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(builder_error="CUDA initialization failure with "
                                                                            "error: 35"))
    with pytest.raises(BackendError, match=r"could not create its Builder on cuda:0 \(TypeError: .*\); TensorRT "
                                           r"said: CUDA initialization failure with error: 35\. .*driver"):
        tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), lambda _: None)


def test_parse_and_build_failures_are_backend_errors(tiny_model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(parse_errors=("UINT8 intermediate", "bad")))
    with pytest.raises(BackendError, match=r"cannot parse .*node 'n0' \(Op\): UINT8 intermediate; node 'n1'"):
        tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), lambda _: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(plan=None))
    with pytest.raises(BackendError, match="failed to build an engine"):
        tb.build_serialized_engine(settings(tmp_path, tiny_model), HostCuda(), lambda _: None)
    assert not (tmp_path / "timing.cache").exists()


@pytest.mark.parametrize("version", ["9.3.0", "12.0.0", "stubs"])
def test_unknown_tensorrt_is_refused(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_tensorrt(version=version)
    if version == "stubs":
        del trt.Builder  # what tensorrt-stubs installs: an importable package without the bindings
    with pytest.raises(BackendError, match="only type stubs" if version == "stubs" else "is not supported"):
        tb.require_tensorrt(trt)


def test_engine_for_builds_once_then_reuses(tiny_model: Path, tmp_path: Path) -> None:
    builder, logs = FakeBuilder(), []
    info = read_model_info(tiny_model)
    options = BackendOptions(device="cuda", precision="fp32", engine_cache_dir=str(tmp_path), workspace_mb=256)
    cuda = HostCuda()
    path, key = tb.engine_for(info, options, cuda, logs.append, VERSION, builder)
    assert path.read_bytes() == b"serialized-engine:fp32" and len(builder.builds) == 1
    built = builder.builds[0]
    assert (built.max_batch, built.workspace_mb, built.input_hw, built.onnx_path) == (4, 256, (32, 48), tiny_model)
    assert built.timing_cache.parent == tmp_path and built.timing_cache.name.startswith("timing-")
    assert any("building a fp32 engine" in line for line in logs)
    assert any(line.startswith("tensorrt: built ") and " s" in line for line in logs)

    again, _ = tb.engine_for(info, options, cuda, logs.append, VERSION, builder)
    assert again == path and len(builder.builds) == 1 and "using cached engine" in logs[-1]

    # Another TensorRT, GPU or precision: a new engine, the old file untouched.
    for opts, version in ((options, "11.4.0.1"), (replace(options, precision="fp16"), VERSION)):
        assert tb.engine_for(info, opts, cuda, logs.append, version, builder)[0] != path
    cuda.name = "NVIDIA GeForce RTX 5090"
    tb.engine_for(info, options, cuda, logs.append, VERSION, builder)
    assert len(builder.builds) == 4 and path.read_bytes() == b"serialized-engine:fp32"


def test_each_precision_builds_from_its_own_onnx(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_model.read_bytes())
    info, builder, cuda = read_model_info(model), FakeBuilder(), HostCuda()
    options = BackendOptions(device="cuda", engine_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(BackendError, match="needs a symmetric int8 Q/DQ model"):
        tb.engine_for(info, replace(options, precision="int8"), cuda, print, VERSION, builder)
    twin = make_qdq_model(model, tmp_path / "m_int8.onnx")
    keys = {}
    for precision in ("fp32", "fp16", "int8"):
        keys[precision] = tb.engine_for(info, replace(options, precision=precision), cuda, print, VERSION, builder)[1]
    sources = [b.onnx_path for b in builder.builds]
    assert sources[0] == model and sources[2] == twin
    assert sources[1].parent == tmp_path / "cache" / "onnx" and "fp16" in sources[1].name
    assert [b.precision for b in builder.builds] == ["fp32", "fp16", "int8"]
    assert len({k.onnx_sha256 for k in keys.values()}) == 3  # the key hashes the per-precision file
    # the int8 file given as the model runs as int8 with the default precision
    _, key = tb.engine_for(read_model_info(twin), options, cuda, print, VERSION, builder)
    assert key.precision == "int8" and key == keys["int8"] and len(builder.builds) == 3


def test_a_graph_tensorrt_refuses_is_never_built(tiny_model: Path, tmp_path: Path) -> None:
    """The first shipped export (Transpose on the uint8 input) fails before any build, saying why."""
    model = onnx.load(str(tiny_model))
    assert [n.op_type for n in model.graph.node[:2]] == ["Cast", "Transpose"]
    first_two = [helper.make_node("Transpose", ["image"], ["t_uint8"], name="/Transpose", perm=[0, 3, 1, 2]),
                 helper.make_node("Cast", ["t_uint8"], ["/Transpose_output_0"], name="/Cast", to=TensorProto.FLOAT)]
    rest = list(model.graph.node[2:])
    del model.graph.node[:]
    model.graph.node.extend([*first_two, *rest])
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    builder = FakeBuilder()
    with pytest.raises(BackendError, match="breaks TensorRT's ONNX rules: .*uint8 input 'image' is read by Transpose"):
        tb.engine_for(read_model_info(bad), BackendOptions(device="cuda", engine_cache_dir=str(tmp_path)),
                      HostCuda(), print, VERSION, builder)
    assert builder.builds == []


def test_failed_build_leaves_no_engine(tiny_model: Path, tmp_path: Path) -> None:
    options = BackendOptions(device="cuda", engine_cache_dir=str(tmp_path))
    with pytest.raises(BackendError, match="failed to build"):
        tb.engine_for(read_model_info(tiny_model), options, HostCuda(), lambda _: None, VERSION,
                      FakeBuilder(fail=True))
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob("*.json"))
