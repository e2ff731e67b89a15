"""TensorRT's ONNX graph rules, held against every model the export writes and every model shipped in models/.

The checker itself is tested on graphs that break each rule: the seed export's Transpose on the uint8 input,
a uint8 tensor inside the graph, a uint8 output not written by Cast, and ONNX Runtime's default quantization
(asymmetric activations, int32 biases).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import REPO
from onnx import TensorProto, helper
from qdq import make_qdq_model

from unet_perception.onnx_rules import check_tensorrt_rules

SHIPPED = sorted((REPO / "models").glob("*.onnx"))


def test_exported_models_follow_the_rules(tiny_model: Path, tiny_carla_model: Path) -> None:
    for model in (tiny_model, tiny_carla_model):
        assert check_tensorrt_rules(model) == []


@pytest.mark.parametrize("model", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_models_follow_the_rules(model: Path) -> None:
    assert check_tensorrt_rules(model) == [], f"{model.name} would not build in TensorRT; re-export it"


def test_symmetric_int8_qdq_follows_the_rules(tiny_model: Path, tmp_path: Path) -> None:
    qdq = make_qdq_model(tiny_model, tmp_path / "tiny_int8.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(qdq)).graph.node)
    assert check_tensorrt_rules(qdq) == []


def test_onnxruntime_default_quantization_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    problems = check_tensorrt_rules(make_qdq_model(tiny_model, tmp_path / "q.onnx", tensorrt_kind=False))
    text = "\n".join(problems)
    assert "dequantizes an int32 bias" in text
    assert "QuantizeLinear node" in text and "other than a constant 0" in text  # asymmetric activations


def graph(nodes: list, outputs: list, initializers: list | None = None) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 4, 4, 3])
    model = helper.make_model(helper.make_graph(nodes, "g", [image], outputs, initializer=initializers or []),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model


def test_transpose_on_the_uint8_input_is_refused() -> None:
    """The first shipped export: Transpose(image) then Cast: a uint8 intermediate and a non-Cast reader."""
    model = graph([helper.make_node("Transpose", ["image"], ["t"], name="/Transpose", perm=[0, 3, 1, 2]),
                   helper.make_node("Cast", ["t"], ["out"], name="/Cast", to=TensorProto.FLOAT)],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])])
    problems = check_tensorrt_rules(model)
    assert len(problems) == 2, problems
    assert "Transpose node '/Transpose' makes uint8 tensor 't' inside the graph" in problems[0]
    assert "uint8 input 'image' is read by Transpose node '/Transpose'" in problems[1]


def test_cast_first_then_back_to_uint8_output() -> None:
    ok = graph([helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
                helper.make_node("Relu", ["f"], ["r"], name="relu"),
                helper.make_node("Cast", ["r"], ["out"], name="out", to=TensorProto.UINT8)],
               [helper.make_tensor_value_info("out", TensorProto.UINT8, [1, 4, 4, 3])])
    assert check_tensorrt_rules(ok) == []
    to_int32 = graph([helper.make_node("Cast", ["image"], ["out"], name="in", to=TensorProto.INT32)],
                     [helper.make_tensor_value_info("out", TensorProto.INT32, [1, 4, 4, 3])])
    assert "cast by 'in' to INT32" in check_tensorrt_rules(to_int32)[0]
    not_cast = graph([helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
                      helper.make_node("Cast", ["f"], ["u"], name="u8", to=TensorProto.UINT8),
                      helper.make_node("Identity", ["u"], ["out"], name="id")],
                     [helper.make_tensor_value_info("out", TensorProto.UINT8, [1, 4, 4, 3])])
    problems = check_tensorrt_rules(not_cast)
    assert any("makes uint8 tensor 'u' inside the graph" in p for p in problems), problems
    assert any("uint8 output 'out' is written by Identity node 'id'" in p for p in problems), problems


def test_qdq_zero_points_must_be_int8_zero() -> None:
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [3])
    model = graph([helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
                   helper.make_node("QuantizeLinear", ["f", "s", "z"], ["q"], name="q"),
                   helper.make_node("DequantizeLinear", ["q", "s", "z"], ["out"], name="dq")],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 3])], [scale, zero])
    problems = check_tensorrt_rules(model)
    assert len(problems) == 2 and all("other than a constant 0" in p for p in problems), problems
    zero.CopyFrom(helper.make_tensor("z", TensorProto.INT8, [], [0]))
    model.graph.initializer[1].CopyFrom(zero)
    assert check_tensorrt_rules(model) == []
    no_zero = graph([helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
                     helper.make_node("QuantizeLinear", ["f", "s"], ["q"], name="q"),
                     helper.make_node("DequantizeLinear", ["q", "s"], ["out"], name="dq")],
                    [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 3])], [scale])
    problems = check_tensorrt_rules(no_zero)
    assert any("quantizes to UINT8" in p for p in problems), problems
    assert any("dequantizes UINT8 data" in p for p in problems), problems
