"""The graph half of unet-import: read what a foreign segmentation ONNX takes and gives, and wrap it in the contract.

The source graph is kept node for node (its tensor names prefixed ``source/`` so none can collide with ours).
Around it:

    image uint8 [N, H, W, 3] RGB -> Cast(float) -> (x - mean) / std -> [Gather to BGR] -> [Transpose to NCHW]
        -> [Cast(float16)] -> source graph -> [Cast(float)] -> [Transpose to NCHW] -> [Resize bilinear to H x W]
        -> ArgMax -> Cast(float) -> Cast(uint8) = labels
        -> 255 / sum(exp(x - max)) (logits) or 255 * max(p) (probabilities) -> Round -> Cast(uint8) = confidence

Logits at any stride are resized with Resize(linear, half_pixel), the ONNX form of torch's
``interpolate(mode="bilinear", align_corners=False)`` that mmsegmentation, segmentation_models_pytorch and
torchvision apply before their argmax; labels-only models are resized nearest. Node forms follow the source's
opset (ReduceSum takes axes as an input from opset 13, ReduceMax from 18).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME

FLOAT, UINT8, FLOAT16 = 1, 2, 10
INTEGER_TYPES = (2, 3, 4, 5, 6, 7, 12, 13)  # uint8, int8, uint16, int16, int32, int64, uint32, uint64
PREFIX = "source/"
MIN_OPSET = 11
OUTPUT_KINDS = ("logits", "probabilities", "labels")


class ImportFailure(ValueError):
    """A source model or option unet-import cannot use; the message is the one line the user sees."""


@dataclass(frozen=True)
class SourceInfo:
    """What the source model takes and gives, as its graph declares it."""

    input_name: str
    input_type: int
    input_dims: tuple[int | str | None, ...]
    output_name: str
    output_type: int
    output_dims: tuple[int | str | None, ...]
    output_producer: str
    output_count: int
    opset: int


@dataclass(frozen=True)
class Wrapping:
    """How to wrap: every choice unet-import made or was told."""

    layout: str              # "nchw" | "nhwc": the source input's layout
    channels: str            # "rgb" | "bgr": the order the source expects
    mean: tuple[float, float, float]  # R, G, B in 0-255 units
    std: tuple[float, float, float]
    input_hw: tuple[int, int]
    output: str              # "logits" | "probabilities" | "labels"
    channel_axis: int        # the class axis of the source output (1 or 3; labels: -1)
    output_hw: tuple[int, int]  # the source output's H and W at input_hw
    batch: int | str         # the source's batch dim: 1 when fixed, else a name


def _dims(value_info: Any) -> tuple[int | str | None, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)


def read_source(model: Any) -> SourceInfo:
    """The source's one image input and the output used (the first); ImportFailure for what cannot be wrapped."""
    graph = model.graph
    inits = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ImportFailure(f"the model has {len(inputs)} inputs ({[i.name for i in inputs]}); unet-import wraps "
                           "models with exactly one image input")
    if not graph.output:
        raise ImportFailure("the model has no outputs")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ImportFailure(f"the model uses ONNX opset {opset}; unet-import needs {MIN_OPSET} or newer (re-export it "
                           f"with opset_version={MIN_OPSET} or higher)")
    inp, out = inputs[0], graph.output[0]
    producer = next((n.op_type for n in graph.node if out.name in n.output), "")
    return SourceInfo(inp.name, inp.type.tensor_type.elem_type, _dims(inp), out.name,
                      out.type.tensor_type.elem_type, _dims(out), producer, len(graph.output), opset)


def detect_layout(src: SourceInfo, layout: str | None) -> str:
    """nchw or nhwc: the option, else the axis that is 3 when only one of axes 1 and 3 is."""
    dims = src.input_dims
    if len(dims) != 4:
        raise ImportFailure(f"input '{src.input_name}' has shape {list(dims)}; an image model takes 4 dims "
                           "(N, C, H, W or N, H, W, C): this is not a segmentation model unet-import can wrap")
    if src.input_type not in (FLOAT, FLOAT16):
        raise ImportFailure(f"input '{src.input_name}' has element type {src.input_type}; unet-import wraps models "
                           "that take float or float16 images")
    first, last = dims[1] == 3, dims[3] == 3
    if layout is None:
        if first == last:
            raise ImportFailure(f"input '{src.input_name}' has shape {list(dims)}: the layout is ambiguous; give "
                               "--layout nchw or --layout nhwc")
        return "nchw" if first else "nhwc"
    axis = 1 if layout == "nchw" else 3
    if isinstance(dims[axis], int) and dims[axis] != 3:
        raise ImportFailure(f"--layout {layout} puts the colour channels on axis {axis}, but input "
                           f"'{src.input_name}' has shape {list(dims)}")
    return layout


def detect_input_hw(src: SourceInfo, layout: str, size: tuple[int, int] | None) -> tuple[int, int]:
    h, w = (src.input_dims[2], src.input_dims[3]) if layout == "nchw" else (src.input_dims[1], src.input_dims[2])
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        if size is not None and size != (h, w):
            raise ImportFailure(f"input '{src.input_name}' is fixed at {h}x{w}; --input-size {size[0]}x{size[1]} "
                               "does not match (leave it out)")
        return h, w
    if size is None:
        raise ImportFailure(f"input '{src.input_name}' has shape {list(src.input_dims)}: H and W are dynamic; give "
                           "--input-size HxW (the size the model was trained or is meant to run at)")
    return size


def detect_output(src: SourceInfo, output: str | None) -> str:
    rank = len(src.output_dims)
    if rank not in (3, 4):
        raise ImportFailure(f"output '{src.output_name}' has shape {list(src.output_dims)}; a segmentation model "
                           "gives N x C x H x W scores or N x H x W labels (is this a classifier?)")
    if output is not None:
        return output
    if src.output_type in INTEGER_TYPES or rank == 3:
        return "labels"
    return "probabilities" if src.output_producer == "Softmax" else "logits"


def _const(graph: Any, name: str, value: Any, dtype: Any = np.float32) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


class _Builder:
    """Appends nodes named ``import/<n>`` to a graph; each method returns its output tensor's name."""

    def __init__(self, graph: Any, opset: int) -> None:
        self.graph, self.opset, self.count = graph, opset, 0

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.count += 1
        name = f"import/{op}_{self.count}"
        out = output or f"{name}_out"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self.count += 1
        return _const(self.graph, f"import/const_{self.count}", value, dtype)

    def cast(self, x: str, to: int, output: str | None = None) -> str:
        return self.node("Cast", [x], output, to=to)

    def reduce(self, op: str, x: str, keepdims: int) -> str:
        """Reduce over axis 1 in the form the opset wants (axes an input: ReduceSum from 13, others from 18)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.const([1], np.int64)], keepdims=keepdims)
        return self.node(op, [x], axes=[1], keepdims=keepdims)

    def axis1(self, op: str, x: str) -> str:
        """Squeeze or Unsqueeze axis 1 (axes an input from opset 13, an attribute before)."""
        if self.opset >= 13:
            return self.node(op, [x, self.const([1], np.int64)])
        return self.node(op, [x], axes=[1])

    def resize(self, x: str, scales: list[float], mode: str) -> str:
        transform = {"linear": "half_pixel", "nearest": "asymmetric"}[mode]
        roi = "" if self.opset >= 13 else self.const(np.zeros(0))  # opset 11-12: roi is a required input
        return self.node("Resize", [x, roi, self.const(scales)], mode=mode, coordinate_transformation_mode=transform,
                         nearest_mode="floor")


def _prefix_names(graph: Any) -> None:
    """Prefix every tensor name of the source graph, so none collides with the contract's names."""
    def rename(name: str) -> str:
        return PREFIX + name if name else name

    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = rename(node.name or node.output[0])
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in coll:
            item.name = rename(item.name)


def wrap(model: Any, src: SourceInfo, how: Wrapping) -> Any:
    """The contract model around ``model`` (modified in place and returned); metadata is the caller's."""
    from onnx import TensorProto, helper

    from unet_perception.contract_graph import exact_scale

    graph = model.graph
    if any(attr.type in (5, 10) for node in graph.node for attr in node.attribute):  # GRAPH / GRAPHS
        raise ImportFailure("the model has If/Loop subgraphs; unet-import wraps plain feed-forward graphs")
    _prefix_names(graph)
    src_in, src_out = PREFIX + src.input_name, PREFIX + src.output_name
    source_nodes = list(graph.node)
    del graph.node[:]
    del graph.input[:]
    del graph.output[:]
    del graph.value_info[:]
    b = _Builder(graph, src.opset)
    h, w = how.input_hw

    x = b.cast(INPUT_NAME, FLOAT)  # the first op on the uint8 input is a Cast (TensorRT's rule)
    if any(m != 0.0 for m in how.mean):
        x = b.node("Sub", [x, b.const(np.reshape(how.mean, (1, 1, 1, 3)))])
    if any(s != 1.0 for s in how.std):
        x = b.node("Div", [x, b.const(np.reshape(how.std, (1, 1, 1, 3)))])
    if how.channels == "bgr":
        x = b.node("Gather", [x, b.const([2, 1, 0], np.int64)], axis=3)
    if how.layout == "nchw":
        x = b.node("Transpose", [x], perm=[0, 3, 1, 2])
    b.cast(x, src.input_type, output=src_in)
    graph.node.extend(source_nodes)

    y = src_out
    if how.output == "labels":
        y = b.cast(y, FLOAT)
        if len(src.output_dims) == 3:
            y = b.axis1("Unsqueeze", y)
        elif how.channel_axis == 3:
            y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
        if how.output_hw != (h, w):
            y = b.resize(y, [1.0, 1.0, exact_scale(how.output_hw[0], h), exact_scale(how.output_hw[1], w)],
                         "nearest")
        y = b.axis1("Squeeze", y)
        b.cast(y, UINT8, output=OUTPUT_NAME)
    else:
        if src.output_type != FLOAT:
            y = b.cast(y, FLOAT)
        if how.channel_axis == 3:
            y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
        if how.output_hw != (h, w):
            y = b.resize(y, [1.0, 1.0, exact_scale(how.output_hw[0], h), exact_scale(how.output_hw[1], w)],
                         "linear")
        labels = b.node("ArgMax", [y], axis=1, keepdims=0)
        b.cast(b.cast(labels, FLOAT), UINT8, output=OUTPUT_NAME)  # int64 -> float -> uint8 (TensorRT's rule)
        if how.output == "logits":  # max softmax = 1 / sum(exp(x - max))
            total = b.reduce("ReduceSum", b.node("Exp", [b.node("Sub", [y, b.reduce("ReduceMax", y, 1)])]), 0)
            conf = b.node("Div", [b.const(255.0), total])
        else:
            conf = b.node("Mul", [b.reduce("ReduceMax", y, 0), b.const(255.0)])
            conf = b.node("Clip", [conf, b.const(0.0), b.const(255.0)])
        b.cast(b.node("Round", [conf]), UINT8, output=CONFIDENCE_NAME)

    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [how.batch, h, w, 3]))
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.UINT8, [how.batch, h, w]))
    if how.output != "labels":
        graph.output.append(helper.make_tensor_value_info(CONFIDENCE_NAME, TensorProto.UINT8, [how.batch, h, w]))
    return model
