"""TensorRT batches in flight, with the fakes (no GPU here): a context, a stream and pinned buffers per slot;
submit enqueues on its slot's stream without waiting; result waits for that stream only; a full backend waits."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_tensorrt import FakeBuilder, FakeEngine, HostCuda, fake_confidence, fake_labels, fake_tensorrt
from unet_perception.backends import tensorrt as trt_backend
from unet_perception.backends.factory import BackendOptions
from unet_perception.model_contract import read_model_info

IN_FLIGHT = 3


@pytest.fixture
def rig(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    cuda = HostCuda()
    info = read_model_info(tiny_model)
    engine = FakeEngine(cuda, info.input_hw, 4)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    options = BackendOptions(max_batch=4, device="cuda", engine_cache_dir=str(tmp_path), in_flight=IN_FLIGHT)
    backend = trt_backend.TensorRTBackend(info, options, cuda=cuda, builder=FakeBuilder(), log=lambda _: None)
    return types.SimpleNamespace(cuda=cuda, engine=engine, backend=backend, hw=info.input_hw)


def frames(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_each_batch_in_flight_has_its_own_context_stream_and_pinned_buffers(rig: Any) -> None:
    cuda, engine = rig.cuda, rig.engine
    with rig.backend as backend:
        assert len(engine.contexts) == IN_FLIGHT and len(cuda.streams) == IN_FLIGHT
        assert cuda.calls["alloc_pinned"] == 3 * IN_FLIGHT and cuda.calls["alloc_device"] == 3 * IN_FLIGHT
        addresses = [set(c.addresses.values()) for c in engine.contexts]
        assert len(set.union(*addresses)) == 3 * IN_FLIGHT  # no buffer shared between two slots
        batches = [frames(n, rig.hw, seed) for seed, n in enumerate((4, 2, 3))]
        pending = [backend.submit(b) for b in batches]
        # all three enqueued (upload, execute, download on one stream each) and nothing waited for yet
        assert cuda.calls["synchronize"] == 0
        streams = [s for kind, s in cuda.events if kind == "execute"]
        assert len(set(streams)) == IN_FLIGHT
        for s in streams:
            assert [k for k, t in cuda.events if t == s] == ["htod", "execute", "dtoh", "dtoh"]
        # results in any order, each waits for its own stream only, each right for its own batch
        for i in (1, 0, 2):
            pred = pending[i].result()
            assert cuda.events[-1] == ("synchronize", streams[i])
            np.testing.assert_array_equal(pred.labels, fake_labels(batches[i]))
            np.testing.assert_array_equal(pred.confidence, fake_confidence(batches[i]))
    assert cuda.memory == {} and cuda.pinned == [] and cuda.streams == set()


def test_submit_waits_for_a_free_slot(rig: Any) -> None:
    with rig.backend as backend:
        batches = [frames(1, rig.hw, seed) for seed in range(IN_FLIGHT + 1)]
        pending = [backend.submit(b) for b in batches[:IN_FLIGHT]]
        late: list[Any] = []
        waiter = threading.Thread(target=lambda: late.append(backend.submit(batches[-1])))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not late, "a fourth batch took a slot that was still in flight"
        first = pending[0].result()  # frees the first slot (after its outputs were copied out)
        waiter.join(5)
        assert late, "the waiting submit never got the freed slot"
        np.testing.assert_array_equal(first.labels, fake_labels(batches[0]))
        np.testing.assert_array_equal(late[0].result().labels, fake_labels(batches[-1]))
        for p in pending[1:]:
            p.result()


def test_one_slot_keeps_the_synchronous_path(rig: Any) -> None:
    """in_flight 1 (the default, and the node with overlap never): infer is upload, execute, download, wait."""
    rig.backend.options = BackendOptions(max_batch=4, device="cuda",
                                         engine_cache_dir=rig.backend.options.engine_cache_dir)
    with rig.backend as backend:
        batch = frames(2, rig.hw, 0)
        np.testing.assert_array_equal(backend.infer(batch).labels, fake_labels(batch))
        assert [k for k, _ in rig.cuda.events] == ["htod", "execute", "dtoh", "dtoh", "synchronize"]
        assert len(rig.engine.contexts) == 1
