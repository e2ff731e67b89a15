"""One ONNX file per precision: the fp16 conversion (uint8 I/O kept, labels agree with fp32, cached), the int8
Q/DQ twin beside the model, and the precision a Q/DQ model runs at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from qdq import make_qdq_model

from unet_perception.backends import precision_onnx as po
from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME
from unet_perception.onnx_rules import check_tensorrt_rules

FLOAT16, UINT8 = onnx.TensorProto.FLOAT16, onnx.TensorProto.UINT8


def run(path: Path, frames: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME, CONFIDENCE_NAME], {INPUT_NAME: frames})


def test_fp16_conversion_keeps_uint8_io_and_agrees(tiny_model: Path, tmp_path: Path) -> None:
    path, precision = po.onnx_for_precision(tiny_model, "fp16", tmp_path)
    assert precision == "fp16" and path.parent == tmp_path / "onnx" and path.suffix == ".onnx"
    model = onnx.load(str(path))
    io = [*model.graph.input, *model.graph.output]
    assert {v.name: v.type.tensor_type.elem_type for v in io} == {
        INPUT_NAME: UINT8, OUTPUT_NAME: UINT8, CONFIDENCE_NAME: UINT8}
    weights = [init for init in model.graph.initializer if init.data_type in (onnx.TensorProto.FLOAT, FLOAT16)]
    assert weights and all(init.data_type == FLOAT16 for init in weights)
    first = next(n for n in model.graph.node if INPUT_NAME in n.input)
    assert first.op_type == "Cast" and first.attribute[0].i == FLOAT16  # the converter alone leaves float32 here
    assert check_tensorrt_rules(path) == []
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    (labels32, conf32), (labels16, conf16) = run(tiny_model, frames), run(path, frames)
    assert (labels16 == labels32).mean() >= 0.99
    assert np.abs(conf16.astype(int) - conf32).max() <= 3


def test_fp16_conversion_of_the_lite_unet(tmp_path: Path) -> None:
    """The default architecture: its decoder's Resize nodes (sizes from Shape) convert and run in float16."""
    import torch

    from unet_perception.class_table import load_class_table
    from unet_perception.networks.lite_unet import LiteUNet
    from unet_perception.training.export import export_onnx

    torch.manual_seed(0)
    table = load_class_table("camvid")
    model = export_onnx(LiteUNet(table.num_classes).eval(), tmp_path / "lite.onnx", table, (64, 96))
    path, _ = po.onnx_for_precision(model, "fp16", tmp_path)
    assert check_tensorrt_rules(model) == [] and check_tensorrt_rules(path) == []
    assert any(n.op_type == "Resize" for n in onnx.load(str(path)).graph.node)
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    assert (run(path, frames)[0] == run(model, frames)[0]).mean() >= 0.99


def test_fp16_conversion_is_cached(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = po.onnx_for_precision(tiny_model, "fp16", tmp_path)
    monkeypatch.setattr(po, "convert_to_fp16", lambda model: pytest.fail("converted twice"))
    again, _ = po.onnx_for_precision(tiny_model, "fp16", tmp_path)
    assert again == first and sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        first.with_suffix(".json").name, first.name]  # the file and its sidecar (sha256 of both models)


def test_mixed_types_after_conversion_are_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the Cast retargeting: without it the graph is float16 behind a Cast to float32."""
    monkeypatch.setattr(po, "FLOAT16", po.FLOAT)  # "retarget" to float32: what the converter alone leaves
    with pytest.raises(BackendError, match="fp16 conversion produced an inconsistent graph"):
        po.convert_to_fp16(onnx.load(str(tiny_model)))


def test_int8_twin_beside_the_model(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_model.read_bytes())
    with pytest.raises(BackendError, match="needs a symmetric int8 Q/DQ model.*no 'm_int8.onnx' beside it"):
        po.onnx_for_precision(model, "int8", tmp_path)
    twin = make_qdq_model(model, tmp_path / "m_int8.onnx")
    assert po.onnx_for_precision(model, "int8", tmp_path) == (twin, "int8")
    assert po.onnx_for_precision(twin, "int8", tmp_path) == (twin, "int8")
    assert po.onnx_for_precision(twin, "fp32", tmp_path) == (twin, "int8")  # a Q/DQ file runs as int8
    assert po.onnx_for_precision(model, "fp32", tmp_path) == (model, "fp32")
    with pytest.raises(BackendError, match="is an int8 Q/DQ model"):
        po.onnx_for_precision(twin, "fp16", tmp_path)


def test_onnxruntime_runs_each_precision(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(tiny_model.read_bytes())
    make_qdq_model(model, tmp_path / "m_int8.onnx")
    frames = np.random.default_rng(1).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    want = run(model, frames)[0]
    for precision, agreement in (("fp32", 1.0), ("fp16", 0.99), ("int8", 0.5)):
        options = BackendOptions(max_batch=2, precision=precision, engine_cache_dir=str(tmp_path / "cache"))
        with create_backend("onnxruntime", model, options) as backend:
            pred = backend.infer(frames)
            assert backend.device == ("cpu" if precision == "fp32" else f"cpu ({precision})")
        assert (pred.labels == want).mean() >= agreement and pred.confidence is not None
