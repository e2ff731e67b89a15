"""The ONNX model contract shared by export and every runtime backend (see DESIGN.md).

- input ``image``: uint8 [N, H, W, 3] RGB at the model's input size; normalisation is in the graph.
- output ``labels``: uint8 [N, H, W] class ids (argmax in the graph).
- optional output ``confidence``: uint8 [N, H, W], the winning class's softmax probability x 255
  (rounded). Models exported before it existed lack it; the runtime then publishes no confidence.
- metadata props (all strings): ``format`` (= METADATA_FORMAT), ``classes`` (JSON list of
  {id, name, color}), ``ignore_index``, ``input_height``, ``input_width``, ``dataset``,
  ``metrics`` (JSON), ``training`` (JSON), ``version``.

This module needs ``onnx``, or ONNX Runtime where onnx is not installed (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_perception.class_table import METADATA_FORMAT, ClassTable

INPUT_NAME = "image"
OUTPUT_NAME = "labels"
CONFIDENCE_NAME = "confidence"
MAX_INPUT_SIDE = 8192
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
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    try:
        try:
            import onnx
        except ImportError:
            meta, inputs, outputs = _read_with_onnxruntime(path)
        else:
            model = onnx.load(str(path), load_external_data=False)
            meta = {p.key: p.value for p in model.metadata_props}
            inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    except Exception as exc:  # onnx raises DecodeError, OSError; onnxruntime its own: all mean "not a model"
        raise ModelError(f"model file '{path}' is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    return info_from_metadata(path, meta, inputs, outputs)


def _read_with_onnxruntime(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """Metadata props, input and output names through an ONNX Runtime session (loads the whole model)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return meta, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def info_from_metadata(path: Path, meta: dict[str, str], inputs: list[str], outputs: list[str]) -> ModelInfo:
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelError(f"model '{path}' has inputs {inputs} and outputs {outputs}; the contract needs "
                         f"input '{INPUT_NAME}' and output '{OUTPUT_NAME}' (export it with unet-export)")
    if meta.get("format") != METADATA_FORMAT:
        raise ModelError(f"model '{path}' has metadata format {meta.get('format')!r}, expected "
                         f"'{METADATA_FORMAT}' (export it with unet-export)")
    try:
        table = ClassTable.from_metadata(meta)
        hw = (int(meta["input_height"]), int(meta["input_width"]))
    except (KeyError, ValueError) as exc:
        raise ModelError(f"model '{path}' has invalid metadata: {exc}") from exc
    if min(hw) < 1 or max(hw) > MAX_INPUT_SIDE:
        raise ModelError(f"model '{path}' has input size {hw[0]}x{hw[1]} in its metadata; each side must be "
                         f"1..{MAX_INPUT_SIDE} (re-export it with unet-export)")
    if table.num_classes >= UNKNOWN_LABEL:
        raise ModelError(f"model '{path}' has {table.num_classes} classes; mono8 labels hold at most "
                         f"{UNKNOWN_LABEL - 1} (id {UNKNOWN_LABEL} means unknown)")
    return ModelInfo(path, table, hw, meta, has_confidence=CONFIDENCE_NAME in outputs)


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
