"""ONNX Runtime backend: runs contract models on CPU, refuses models and devices it cannot serve, with
messages that say how to fix it."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import ORT_BOUNDS_SPIN, SHIPPED_MODEL
from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import BackendOptions
from unet_perception.backends.onnxruntime import (OnnxRuntimeBackend, _providers, create, spin_entries,
                                                  unavailable_reason)
from unet_perception.class_table import load_class_table
from unet_perception.model_contract import make_metadata, read_model_info

RNG = np.random.default_rng(2)
TIMEOUT_S = 20.0


def frames(n: int, hw: tuple[int, int] = (32, 48)) -> np.ndarray:
    return RNG.integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_infer_matches_a_plain_session(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    batch = frames(3)
    expected = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"]).run(
        ["labels"], {"image": batch})[0]
    with create(info, BackendOptions(max_batch=3, threads=1)) as backend:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert (backend.name, backend.device, backend.input_hw) == ("onnxruntime", "cpu", (32, 48))
        assert [x.get_session_options().intra_op_num_threads for x in backend.sessions] == [1]
        got = backend.infer(batch).labels
        assert got.dtype == np.uint8 and got.shape == (3, 32, 48)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(backend.infer(batch[1:2]).labels[0], expected[1])
    assert not backend.active and backend.sessions == []
    np.testing.assert_array_equal(backend.infer(batch[:1]).labels[0], expected[0])  # re-activates on demand
    backend.close()


@pytest.mark.parametrize("threads, sessions", [(1, 1), (2, 3), (0, 3)])
def test_concurrent_callers_get_sessions_of_their_own_unless_one_thread(tiny_model: Path, threads: int,
                                                                        sessions: int) -> None:
    """concurrent 3 (the node's workers): three sessions of ``threads`` each, or with one thread a single session that
    the callers share (it runs on the calling thread); runs from three threads at once give a plain session's labels."""
    batches = [frames(1) for _ in range(24)]
    plain = ort.InferenceSession(str(tiny_model), providers=["CPUExecutionProvider"])
    expected = [plain.run(["labels"], {"image": b})[0] for b in batches]
    with create(read_model_info(tiny_model), BackendOptions(max_batch=1, threads=threads, concurrent=3)) as backend:
        each = threads or max(1, len(os.sched_getaffinity(0)) // 3)  # 0: the cores this process may use, shared
        assert [x.get_session_options().intra_op_num_threads for x in backend.sessions] == [each] * sessions
        together = threading.Barrier(3, timeout=TIMEOUT_S)  # broken unless three runs are in progress at once
        for session in backend.sessions:
            session.run = partial(lambda real, *a, **k: (together.wait(), real(*a, **k))[1], session.run)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda b: backend.infer(b).labels, batches))
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("batch, match", [
    (frames(5), "batch of 5 frames, max_batch is 4"),
    (frames(1, (48, 32)), r"batch must be uint8 \[N, 32, 48, 3\], got uint8 \[1, 48, 32, 3\]"),
    (frames(1).astype(np.float32), "got float32"),
])
def test_bad_batches_are_refused(tiny_model: Path, batch: np.ndarray, match: str) -> None:
    backend = create(read_model_info(tiny_model), BackendOptions())
    with pytest.raises(BackendError, match=match):
        backend.infer(batch)
    backend.close()


def test_missing_gpu_provider_says_how_to_install_it(tiny_model: Path) -> None:
    provider = "CUDAExecutionProvider"
    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    options = BackendOptions(device="cuda")
    reason = unavailable_reason(options)
    assert reason is not None and provider in reason and "pip install onnxruntime-gpu" in reason
    with pytest.raises(BackendError, match=f"has no {provider}.*pip install onnxruntime-gpu"):
        create(read_model_info(tiny_model), options)


def test_unknown_device_is_refused(tiny_model: Path) -> None:
    for device in ("gpu", "tensorrt"):  # ONNX Runtime's TensorRT provider is not offered: backend tensorrt is
        with pytest.raises(BackendError, match=rf"device must be one of \('cpu', 'cuda'\).*got '{device}'"):
            create(read_model_info(tiny_model), BackendOptions(device=device))
    assert unavailable_reason(BackendOptions()) is None


def test_provider_chains_follow_the_device() -> None:
    assert _providers(BackendOptions(device="cpu")) == ["CPUExecutionProvider"]
    assert _providers(BackendOptions(device="cuda", gpu_id=1)) == [
        ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]


def contract_like_model(path: Path, *, input_shape: list, output_type: int = TensorProto.UINT8,
                        meta_hw: tuple[int, int] = (32, 48)) -> Path:
    """A tiny graph (labels = max over the colour channels) with the contract's metadata, to bend one rule."""
    nodes = [helper.make_node("ReduceMax", ["image"], ["max"], keepdims=0, axes=[3])]
    nodes.append(helper.make_node("Cast", ["max"], ["labels"], to=output_type))
    graph = helper.make_graph(
        nodes, "contract_like",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, input_shape)],
        [helper.make_tensor_value_info("labels", output_type, input_shape[:3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in make_metadata(load_class_table("camvid"), meta_hw).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_a_hand_made_contract_model_runs(tmp_path: Path) -> None:
    path = contract_like_model(tmp_path / "ok.onnx", input_shape=["N", 32, 48, 3])
    batch = frames(2)
    with create(read_model_info(path), BackendOptions(max_batch=2)) as backend:
        np.testing.assert_array_equal(backend.infer(batch).labels, batch.max(axis=3))


@pytest.mark.parametrize("kwargs, max_batch, match", [
    ({"input_shape": ["N", 32, 48, 3], "output_type": TensorProto.INT64}, 4,
     "'labels' is tensor\\(int64\\), the contract needs tensor\\(uint8\\)"),
    ({"input_shape": ["N", 64, 48, 3]}, 4, r"'image' has shape \['N', 64, 48, 3\], its metadata says \['N', 32"),
    ({"input_shape": [2, 32, 48, 3]}, 4, "fixed batch of 2; export it with a dynamic batch axis"),
    ({"input_shape": [1, 32, 48, 3]}, 4, "fixed batch of 1"),
])
def test_models_off_the_contract_are_refused(tmp_path: Path, kwargs: dict, max_batch: int, match: str) -> None:
    path = contract_like_model(tmp_path / "bad.onnx", **kwargs)
    backend = create(read_model_info(path), BackendOptions(max_batch=max_batch))
    with pytest.raises(BackendError, match=match):
        backend.activate()
    assert not backend.active


def test_a_batch_one_model_serves_max_batch_one(tmp_path: Path) -> None:
    path = contract_like_model(tmp_path / "b1.onnx", input_shape=[1, 32, 48, 3])
    with create(read_model_info(path), BackendOptions(max_batch=1)) as backend:
        assert backend.infer(frames(1)).labels.shape == (1, 32, 48)


def test_an_unloadable_model_file_names_the_path(tmp_path: Path, tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_model.read_bytes()[:2000])
    backend = create(type(info)(broken, info.classes, info.input_hw, info.metadata), BackendOptions())
    with pytest.raises(BackendError, match=f"onnxruntime cannot load '{broken}'"):
        backend.activate()


def test_the_cpu_path_runs_without_onnx(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rosdep has no key for onnx, so a ROS install may lack it: metadata comes from ONNX Runtime then, the
    model runs, an int8 twin is still told apart, and a broken file is still a ModelError naming it."""
    import sys

    from qdq import make_qdq_model
    from unet_perception.backends.precision_onnx import is_qdq_model
    from unet_perception.model_contract import ModelError

    int8 = make_qdq_model(tiny_model, tmp_path / "tiny_int8.onnx")
    with_onnx = read_model_info(tiny_model)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError from here on
    info = read_model_info(tiny_model)
    assert (info.classes, info.input_hw, info.has_confidence, info.metadata) == \
        (with_onnx.classes, with_onnx.input_hw, with_onnx.has_confidence, with_onnx.metadata)
    assert is_qdq_model(int8) and not is_qdq_model(tiny_model)
    with create(info, BackendOptions(max_batch=2)) as backend:
        assert backend.infer(frames(2)).labels.shape == (2, 32, 48)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="broken.onnx"):
        read_model_info(broken)


def _idle_cpu_ms_after_a_run(options: BackendOptions) -> list[float]:
    """CPU this process spends in the 300 ms after each of three runs of the shipped model on two threads."""
    import time

    info = read_model_info(SHIPPED_MODEL)
    batch = np.zeros((1, *info.input_hw, 3), np.uint8)
    idle = []
    with create(info, options) as backend:
        backend.infer(batch)
        for _ in range(3):
            backend.infer(batch)
            start = time.process_time()
            time.sleep(0.3)
            idle.append(1e3 * (time.process_time() - start))
    return idle




@pytest.mark.skipif(not ORT_BOUNDS_SPIN, reason=f"onnxruntime {ort.__version__} cannot bound the spin")
def test_spin_us_bounds_how_long_idle_threads_hold_a_core() -> None:
    """The node's default (spin 100 us): the pool's second thread sleeps soon after a run, where ONNX Runtime's own
    spin (spin_us 0) holds a core for much of the gap (41-51 ms of every 300 measured on the 2-core VM); the
    options reach the session as its config entries."""
    bounded = BackendOptions(max_batch=1, threads=2, spinning=True, spin_us=100)
    assert min(_idle_cpu_ms_after_a_run(bounded)) < 10.0
    assert max(_idle_cpu_ms_after_a_run(BackendOptions(max_batch=1, threads=2, spinning=True, spin_us=0))) > 10.0
    with create(read_model_info(SHIPPED_MODEL), bounded) as backend:
        entries = backend.sessions[0].get_session_options()
        assert (entries.get_session_config_entry("session.intra_op.allow_spinning"),
                entries.get_session_config_entry("session.intra_op.spin_duration_us")) == ("1", "100")


@pytest.mark.parametrize("spinning, spin_us, version, expected", [
    (True, 100, "1.32.0", {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": "100"}),
    (True, 100, "1.26.0", {"session.intra_op.allow_spinning": "1", "session.intra_op.spin_duration_us": "100"}),
    (True, 0, "1.32.0", {"session.intra_op.allow_spinning": "1"}),
    (False, 100, "1.32.0", {"session.intra_op.allow_spinning": "0"}),
    # 1.25 ignores spin_duration_us (it is not in its library) and would spin unbounded: no spin instead
    (True, 100, "1.25.1", {"session.intra_op.allow_spinning": "0"}),
    (True, 100, "1.20.0+cu118", {"session.intra_op.allow_spinning": "0"}),
    (True, 0, "1.20.0", {"session.intra_op.allow_spinning": "1"}),
    (True, 100, "unknown", {"session.intra_op.allow_spinning": "0"}),
    (True, 100, "1.2rc1", {"session.intra_op.allow_spinning": "0"}),
])
def test_spin_entries_follow_the_onnxruntime_version(spinning: bool, spin_us: int, version: str,
                                                     expected: dict[str, str]) -> None:
    assert spin_entries(spinning, spin_us, version) == expected


def test_an_old_onnxruntime_says_why_it_does_not_spin(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="unet_perception"):
        spin_entries(True, 100, "1.25.1")
    assert "onnxruntime 1.25.1 cannot bound the spin" in caplog.text and "1.26 or later" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="unet_perception"):
        spin_entries(True, 100, "1.26.0")
        spin_entries(False, 100, "1.25.1")  # asked not to spin: nothing to say
    assert caplog.text == ""
