"""Graph surgery that gives a contract ONNX file the two properties TensorRT needs on first contact.

- Labels leave the graph as ArgMax -> Cast(float) -> Cast(uint8): TensorRT converts to and from uint8 only from
  float or half, so the direct INT64 -> UINT8 Cast the torch exporter writes is split in two.
- Every Resize takes constant scales: a ``sizes`` input computed at run time (Shape -> Gather -> Concat) leaves
  the output dims unknown to TensorRT's parser (-1 in the engine). The input's H and W are fixed by the contract,
  so each Resize's real input and output sizes are measured once with ONNX Runtime and written as constant
  scales; the dead shape arithmetic is removed and the outputs' H and W become static in the graph.

``make_tensorrt_ready(model)`` does both and is idempotent: export, unet-import and the re-export of the shipped
files all go through it. Needs ``onnx`` and ONNX Runtime (no torch).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

UINT8, INT8, INT32, INT64, FLOAT, FLOAT16 = 2, 3, 6, 7, 1, 10  # onnx.TensorProto element types


def constant_names(graph: Any) -> set[str]:
    """Names of initializers and Constant node outputs."""
    names = {init.name for init in graph.initializer}
    names.update(node.output[0] for node in graph.node if node.op_type == "Constant")
    return names


def runtime_resizes(graph: Any) -> list[Any]:
    """Resize nodes whose scales or sizes input is computed at run time (not a constant)."""
    consts = constant_names(graph)
    return [node for node in graph.node if node.op_type == "Resize"
            and any(name and name not in consts for name in node.input[2:4])]


def cast_to(node: Any) -> int | None:
    return next((attr.i for attr in node.attribute if attr.name == "to"), None)


def infer_types_and_shapes(model: Any) -> tuple[dict[str, int], dict[str, list[int | str | None]]]:
    """Name -> element type and name -> dims (int, symbolic name or None) by ONNX shape inference.

    The graph outputs' declared shapes are dropped first, so their dims are what the graph computes, not what an
    exporter wrote down.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for out in copy.graph.output:
        out.type.tensor_type.ClearField("shape")
    del copy.graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(copy).graph
    types: dict[str, int] = {}
    shapes: dict[str, list[int | str | None]] = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        types[v.name] = v.type.tensor_type.elem_type
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in v.type.tensor_type.shape.dim]
    types.update({init.name: init.data_type for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types, shapes


def probe_shapes(model: Any, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The real shapes of tensors ``names`` when the model runs on one all-zero frame (ONNX Runtime)."""
    import onnx
    import onnxruntime as ort

    types, _ = infer_types_and_shapes(model)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output}
    for name in names:
        if name not in known:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, FLOAT), None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor by name
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {}
    for i in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[i.name])
        feed[i.name] = np.zeros(dims, dtype=dtype)
    values = session.run(names, feed)
    return {name: tuple(int(d) for d in v.shape) for name, v in zip(names, values)}


def exact_scale(size_in: int, size_out: int) -> float:
    """The float32 scale closest to out/in for which floor(in * scale) is exactly ``size_out``.

    ONNX (and ONNX Runtime, in float32) compute a Resize's output size as floor(in * scale); 500/63 rounded to
    float32 times 63 falls just short of 500, so the scale is nudged up by ulps until both float32 and float64
    arithmetic land on ``size_out``.
    """
    scale = np.float32(size_out / size_in)
    for _ in range(64):
        if (math.floor(float(np.float32(scale) * np.float32(size_in))) >= size_out
                and math.floor(float(scale) * size_in) >= size_out):
            break
        scale = np.nextafter(scale, np.float32(np.inf))
    assert math.floor(float(scale) * size_in) == size_out, (size_in, size_out, scale)
    return float(scale)


def freeze_resizes(model: Any) -> int:
    """Give every Resize with run-time scales or sizes constant scales measured by ONNX Runtime; returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    dynamic = runtime_resizes(graph)
    if not dynamic:
        return 0
    shapes = probe_shapes(model, sorted({n.input[0] for n in dynamic} | {n.output[0] for n in dynamic}))
    for node in dynamic:
        dims_in, dims_out = shapes[node.input[0]], shapes[node.output[0]]
        scales = np.array([exact_scale(a, b) for a, b in zip(dims_in, dims_out)], dtype=np.float32)
        name = f"{node.name or node.output[0]}_static_scales"
        graph.initializer.append(numpy_helper.from_array(scales, name))
        x, roi = node.input[0], (node.input[1] if len(node.input) > 1 else "")
        del node.input[:]
        node.input.extend([x, roi, name])  # no sizes: ONNX allows scales or sizes, not both
    return len(dynamic)


def split_label_casts(model: Any) -> int:
    """Insert Cast(float) before every Cast to uint8 that reads an integer tensor; returns how many."""
    from onnx import helper

    graph = model.graph
    types, _ = infer_types_and_shapes(model)
    nodes = list(graph.node)
    done = 0
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        if node.op_type != "Cast" or cast_to(node) != UINT8 or types.get(node.input[0]) in (FLOAT, FLOAT16, None):
            continue
        as_float = f"{node.input[0]}_as_float"
        nodes.insert(index, helper.make_node("Cast", [node.input[0]], [as_float], name=f"{node.name}_to_float",
                                             to=FLOAT))
        node.input[0] = as_float
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def prune(model: Any) -> None:
    """Drop nodes and initializers that no graph output depends on (the shape arithmetic a frozen Resize left)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def set_output_shapes(model: Any) -> None:
    """Write the inferred output shapes into the graph's outputs (static H and W once the Resizes are frozen)."""
    _, shapes = infer_types_and_shapes(model)
    first = model.graph.input[0].type.tensor_type.shape.dim[0] if model.graph.input else None
    batch = first.dim_param if first is not None and first.dim_param else "batch"
    for out in model.graph.output:
        dims = shapes.get(out.name)
        if dims is None:
            continue
        shape = out.type.tensor_type.shape
        shape.ClearField("dim")
        for i, d in enumerate(dims):
            dim = shape.dim.add()
            if isinstance(d, int) and d > 0:
                dim.dim_value = d
            else:
                dim.dim_param = batch if i == 0 else f"{out.name}_dim_{i}"  # inference names them unk__N
    del model.graph.value_info[:]


def make_tensorrt_ready(model: Any) -> Any:
    """``model`` with split label Casts, frozen Resizes and static output shapes (changed in place, returned)."""
    freeze_resizes(model)
    split_label_casts(model)
    prune(model)
    set_output_shapes(model)
    return model
