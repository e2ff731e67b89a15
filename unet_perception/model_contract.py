"""The ONNX model contract shared by export and every runtime backend (for users: docs/models.md, "The model
contract").

- input ``image``: uint8 [N, H, W, 3] RGB at the model's input size; normalisation is in the graph.
- output ``labels``: uint8 [N, H, W] class ids (argmax in the graph, then Cast to float, then to uint8: TensorRT
  converts to uint8 only from float or half).
- optional output ``confidence``: uint8 [N, H, W], the winning class's softmax probability x 255
  (rounded). Models exported before it existed, and imported models that give labels only, lack it; the runtime
  then publishes no confidence.
- H and W of every output are static in the graph (every Resize takes constant scales: contract_graph.py), so a
  TensorRT engine reports fixed output dims.
- metadata props (all strings): ``format`` (= METADATA_FORMAT), ``classes`` (JSON list of
  {id, name, color}), ``ignore_index``, ``input_height``, ``input_width``, ``dataset``,
  ``metrics`` (JSON), ``training`` (JSON), ``version``.

This module needs ``onnx``, or ONNX Runtime where onnx is not installed (no torch).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_perception.class_table import (METADATA_FORMAT, ClassTable, TableError, check_text, metadata_int,
                                         parse_json, shown)

INPUT_NAME = "image"
OUTPUT_NAME = "labels"
CONFIDENCE_NAME = "confidence"
MAX_INPUT_SIDE = 8192
MAX_MODEL_BYTES = 2**31  # protobuf cannot hold more
UNKNOWN_LABEL = 255  # label for pixels under the unknown threshold; never a class id (at most 255 classes)


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model file, read from its metadata."""

    path: Path
    classes: ClassTable
    input_hw: tuple[int, int]
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    has_confidence: bool = False

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metadata.get("metrics", "{}") or "{}")


class ModelError(RuntimeError):
    """A model file that is missing, unreadable or does not follow the contract."""


def read_model_info(path: str | Path) -> ModelInfo:
    """Read and validate an exported model's metadata; raises ModelError naming the path and problem.

    Uses ``onnx`` when it imports, else ONNX Runtime (rosdep has no key for onnx, so a ROS install may lack it).
    """
    path = Path(path)
    data = read_model_bytes(path)
    try:
        try:
            import onnx
        except ImportError:
            meta, inputs, outputs = _read_with_onnxruntime(data)
        else:
            model = onnx.load_model_from_string(data)
            meta = {p.key: p.value for p in model.metadata_props}
            inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    except Exception as exc:  # onnx raises DecodeError, OSError; onnxruntime its own: all mean "not a model"
        raise ModelError(f"model file '{path}' is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return info_from_metadata(path, meta, inputs, outputs)


def check_model_file(path: Path) -> None:
    """ModelError unless ``path`` is a regular file: a folder, device, FIFO or socket is named as such
    (stat only: nothing is opened, so nothing blocks)."""
    try:
        kind = _not_regular(path.stat().st_mode)
    except FileNotFoundError:
        raise ModelError(f"model file '{path}' does not exist") from None
    except OSError as exc:
        raise ModelError(f"model file '{path}' cannot be read: {exc.strerror}") from None
    if kind:
        raise ModelError(f"model file '{path}' is {kind}, not a model file{_onnx_inside(path)}")


def read_model_bytes(path: Path) -> bytes:
    """The file's bytes, if it is a regular file (check_model_file), opened non-blocking and checked again in
    case it was swapped for a FIFO meanwhile."""
    check_model_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelError(f"model file '{path}' does not exist") from None
    except OSError as exc:
        raise ModelError(f"model file '{path}' cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        kind = _not_regular(st.st_mode)
        if kind:
            raise ModelError(f"model file '{path}' is {kind}, not a model file")
        if st.st_size > MAX_MODEL_BYTES:  # protobuf's own limit: weights beyond it live in external data files
            raise ModelError(f"model file '{path}' is {st.st_size / 2**30:.1f} GiB; an ONNX model is at most 2 GiB")
        return f.read()


def _not_regular(mode: int) -> str:
    """'' for a regular file, else what it is."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return "" if stat.S_ISREG(mode) else next((name for test, name in kinds if test(mode)), "not a regular file")


def _onnx_inside(path: Path) -> str:
    """For a folder: the .onnx files in it, as a hint."""
    try:
        found = sorted(p.name for p in path.glob("*.onnx"))[:3] if path.is_dir() else []
    except OSError:
        found = []
    return f"; give the path of a file in it, e.g. {', '.join(found)}" if found else \
        ("; give the path of an .onnx file" if path.is_dir() else "")


def _read_with_onnxruntime(data: bytes) -> tuple[dict[str, str], list[str], list[str]]:
    """Metadata props, input and output names through an ONNX Runtime session (loads the whole model)."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return meta, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def info_from_metadata(path: Path, meta: dict[str, str], inputs: list[str], outputs: list[str]) -> ModelInfo:
    """Check every metadata field the project reads; ModelError naming the file and the field otherwise."""
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(f"model '{path}' has inputs {inputs} and outputs {outputs}; the contract needs "
                         f"input '{INPUT_NAME}' and output '{OUTPUT_NAME}' (export it with unet-export)")
    if meta.get("format") != METADATA_FORMAT:
        raise ModelError(f"model '{path}' has metadata format {shown(meta.get('format'))}, expected "
                         f"'{METADATA_FORMAT}' (export it with unet-export)")
    try:
        table = ClassTable.from_metadata(meta)
        hw = tuple(metadata_int(meta.get(key), key, 1, MAX_INPUT_SIDE) for key in ("input_height", "input_width"))
        for key in ("metrics", "training"):  # JSON objects; quantize and the model card read them
            if meta.get(key) and not isinstance(parse_json(meta[key], key), dict):
                raise TableError(key, f"must be a JSON object, got {shown(parse_json(meta[key], key))}")
        if "version" in meta:
            check_text(meta["version"], "version", allow_empty=True)
    except TableError as exc:
        raise ModelError(f"model '{path}': metadata field {exc}; re-export it with unet-export") from None
    if table.num_classes > UNKNOWN_LABEL:
        raise ModelError(f"model '{path}' has {table.num_classes} classes; mono8 labels hold at most "
                         f"{UNKNOWN_LABEL} (ids 0..{UNKNOWN_LABEL - 1}; {UNKNOWN_LABEL} means unknown)")
    return ModelInfo(path, table, hw, meta, has_confidence=CONFIDENCE_NAME in outputs)  # type: ignore[arg-type]


def make_metadata(table: ClassTable, input_hw: tuple[int, int], *, metrics: dict | None = None,
                  training: dict | None = None, version: str = "") -> dict[str, str]:
    """The metadata props written by export."""
    return {
        "format": METADATA_FORMAT,
        "classes": table.to_json(),
        "ignore_index": "" if table.ignore_index is None else str(table.ignore_index),
        "dataset": table.name,
        "input_height": str(input_hw[0]),
        "input_width": str(input_hw[1]),
        "metrics": json.dumps(metrics or {}),
        "training": json.dumps(training or {}),
        "version": version,
    }
