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


def test_labels_cast_from_int64_straight_to_uint8_is_refused() -> None:
    """Every shipped file until the contract update: ArgMax -> Cast(UINT8); TensorRT wants float in between."""
    def argmax_graph(*casts: int) -> onnx.ModelProto:
        nodes = [helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
                 helper.make_node("ArgMax", ["f"], ["a"], name="argmax", axis=3, keepdims=0)]
        names = ["a", *[f"c{i}" for i in range(len(casts) - 1)], "labels"]
        nodes += [helper.make_node("Cast", [names[i]], [names[i + 1]], name=f"cast{i}", to=to)
                  for i, to in enumerate(casts)]
        return graph(nodes, [helper.make_tensor_value_info("labels", TensorProto.UINT8, [1, 4, 4])])

    problems = check_tensorrt_rules(argmax_graph(TensorProto.UINT8))
    assert len(problems) == 1 and "casts INT64 'a' to uint8" in problems[0], problems
    assert check_tensorrt_rules(argmax_graph(TensorProto.FLOAT, TensorProto.UINT8)) == []
    assert check_tensorrt_rules(argmax_graph(TensorProto.FLOAT16, TensorProto.UINT8)) == []


def test_resize_with_sizes_from_shape_is_refused_and_frozen() -> None:
    """A Shape -> Gather -> Concat sizes chain: refused (the engine would say -1); the surgery makes it static."""
    import numpy as np

    from unet_perception.contract_graph import make_tensorrt_ready

    nodes = [helper.make_node("Cast", ["image"], ["f"], name="in", to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["f"], ["t"], name="t", perm=[0, 3, 1, 2]),
             helper.make_node("Shape", ["t"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "hw_idx"], ["hw"], name="gather", axis=0),
             helper.make_node("Mul", ["hw", "two"], ["hw2"], name="mul"),
             helper.make_node("Gather", ["s", "nc_idx"], ["nc"], name="gather_nc", axis=0),
             helper.make_node("Concat", ["nc", "hw2"], ["sizes"], name="concat", axis=0),
             helper.make_node("Resize", ["t", "", "", "sizes"], ["r"], name="resize", mode="linear"),
             helper.make_node("ArgMax", ["r"], ["a"], name="argmax", axis=1, keepdims=0),
             helper.make_node("Cast", ["a"], ["af"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["af"], ["labels"], name="to_u8", to=TensorProto.UINT8)]
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("hw_idx", [2, 3]), ("nc_idx", [0, 1]), ("two", [2, 2]))]
    model = graph(nodes, [helper.make_tensor_value_info("labels", TensorProto.UINT8, ["n", "h", "w"])], inits)
    problems = check_tensorrt_rules(model)
    assert any("Resize node 'resize' takes its scales or sizes from a tensor computed at run time" in p
               for p in problems), problems
    assert any("output 'labels' has shape" in p for p in problems), problems
    fixed = make_tensorrt_ready(model)
    assert check_tensorrt_rules(fixed) == []
    assert [d.dim_value for d in fixed.graph.output[0].type.tensor_type.shape.dim[1:]] == [8, 8]
    assert not any(n.op_type in ("Shape", "Gather", "Concat") for n in fixed.graph.node)


def test_exact_scale_lands_on_the_size() -> None:
    """500 / 63 in float32 times 63 floors to 499: the scale is nudged until it gives 500."""
    import math

    import numpy as np

    from unet_perception.contract_graph import exact_scale

    assert math.floor(float(np.float32(500 / 63)) * 63) == 499
    for size_in, size_out in ((63, 500), (64, 512), (17, 135), (128, 256), (45, 360)):
        scale = exact_scale(size_in, size_out)
        assert math.floor(scale * size_in) == size_out
        assert math.floor(float(np.float32(scale) * np.float32(size_in))) == size_out
