"""TensorRT's rules for an ONNX graph, checked without TensorRT: what its ONNX parser refuses, found on the CPU.

- uint8 tensors only at the graph's edges ("TensorRT does not support UINT8 types for intermediate tensors");
- a uint8 input is read only by Cast (to float or float16), and a uint8 output is written only by Cast;
- a Cast to uint8 reads float or float16 only (TensorRT's DataType documentation allows uint8 conversions only from
  and to those), so labels leave as ArgMax -> Cast(float) -> Cast(uint8), never INT64 -> UINT8;
- every Resize takes constant scales or sizes, and every output's dims after the batch are static under ONNX shape
  inference: a sizes tensor computed at run time (Shape -> Gather -> Concat) gives the engine -1 output dims;
- Q/DQ only as symmetric int8: QuantizeLinear with an int8 zero point of 0 (without one it makes uint8), and
  DequantizeLinear of int8 only: no uint8 Q/DQ, no int32 bias DequantizeLinear ("only activation types allowed
  as input to this layer").

``check_tensorrt_rules(path_or_model)`` returns one message per violation (empty: the graph follows them).
Needs only ``onnx``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from unet_perception.contract_graph import cast_to as _cast_to
from unet_perception.contract_graph import infer_types_and_shapes, runtime_resizes

UINT8, INT8, INT32, FLOAT, FLOAT16 = 2, 3, 6, 1, 10  # onnx.TensorProto element types
CAST_TARGETS = (FLOAT, FLOAT16)
RETROFIT = ("re-export it with unet-export or unet-import, or bring an older export up to date with "
            "python -m unet_perception.training.retrofit OLD.onnx NEW.onnx")


def _load(path_or_model: str | Path | Any) -> Any:
    import onnx

    if isinstance(path_or_model, (str, Path)):
        return onnx.load(str(path_or_model), load_external_data=False)
    return path_or_model


def _constants(graph: Any) -> dict[str, Any]:
    """Name -> NumPy value of every initializer and Constant node output."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values




def check_tensorrt_rules(path_or_model: str | Path | Any) -> list[str]:
    """Every way the graph breaks TensorRT's uint8 and Q/DQ rules, as messages naming node and tensor."""
    from onnx import TensorProto

    model = _load(path_or_model)
    graph = model.graph
    types, shapes = infer_types_and_shapes(model)
    constants = _constants(graph)
    inputs = {i.name for i in graph.input} - {init.name for init in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    name_of = TensorProto.DataType.Name
    problems: list[str] = []

    for node in graph.node:
        label = f"{node.op_type} node '{node.name}'"
        for out in node.output:
            if types.get(out) == UINT8 and out not in outputs and node.op_type != "QuantizeLinear":
                problems.append(f"{label} makes uint8 tensor '{out}' inside the graph; TensorRT allows uint8 only "
                                "as a graph input or output (cast to float first)")
            if out in outputs and types.get(out) == UINT8 and node.op_type != "Cast":
                problems.append(f"uint8 output '{out}' is written by {label}; TensorRT needs a Cast to write it")
        if node.op_type == "QuantizeLinear" and types.get(node.output[0]) != INT8:
            made = types.get(node.output[0])
            problems.append(f"{label} quantizes to {name_of(made) if made else 'an unknown type'} (without an int8 "
                            "zero point it makes uint8); TensorRT needs int8 with zero point 0 (symmetric)")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            data = node.input[0]
            bad_data = node.op_type == "DequantizeLinear" and types.get(data) != INT8
            if bad_data:
                what = name_of(types[data]) if data in types else "unknown"
                kind = "an int32 bias" if types.get(data) == INT32 else f"{what} data"
                problems.append(f"{label} dequantizes {kind} ('{data}'); TensorRT's DequantizeLinear takes only int8 "
                                "activations and weights (leave biases in float)")
            zero = node.input[2] if len(node.input) > 2 and node.input[2] else ""
            if zero and not bad_data:
                value = constants.get(zero)
                if types.get(zero) != INT8:
                    what = name_of(types[zero]) if zero in types else "unknown"
                    problems.append(f"{label} has a {what} zero point '{zero}'; TensorRT needs int8 (symmetric)")
                elif value is None or value.any():
                    problems.append(f"{label} has zero point '{zero}' other than a constant 0; TensorRT needs "
                                    "symmetric quantization")

        if node.op_type == "Cast" and _cast_to(node) == UINT8 and types.get(node.input[0]) not in CAST_TARGETS:
            made = types.get(node.input[0])
            problems.append(f"{label} casts {name_of(made) if made else 'an unknown type'} '{node.input[0]}' to "
                            "uint8; TensorRT converts to uint8 only from float or float16 (Cast to float first; "
                            + RETROFIT + ")")
    for node in runtime_resizes(graph):
        problems.append(f"Resize node '{node.name}' takes its scales or sizes from a tensor computed at run time; "
                        "TensorRT then reports -1 output dims (constant scales needed; " + RETROFIT + ")")
    for out in graph.output:
        dims = shapes.get(out.name)
        if dims is None or any(not isinstance(d, int) or d < 1 for d in dims[1:]):
            problems.append(f"output '{out.name}' has shape {dims} in the graph; every dim after the batch must be "
                            "static, or the engine reports -1 (" + RETROFIT + ")")

    for name in sorted(inputs):
        if types.get(name) != UINT8:
            continue
        for node in readers[name]:
            if node.op_type != "Cast":
                problems.append(f"uint8 input '{name}' is read by {node.op_type} node '{node.name}'; TensorRT needs "
                                "every reader of a uint8 input to be a Cast to float")
            elif _cast_to(node) not in CAST_TARGETS:
                problems.append(f"uint8 input '{name}' is cast by '{node.name}' to {name_of(_cast_to(node) or 0)}; "
                                "TensorRT casts uint8 only to float or float16")
    for init in graph.initializer:
        if init.data_type == UINT8 and not all(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                               for n in readers[init.name]):
            problems.append(f"uint8 initializer '{init.name}' is a tensor inside the graph; TensorRT allows uint8 "
                            "only as a graph input or output")
    return problems
