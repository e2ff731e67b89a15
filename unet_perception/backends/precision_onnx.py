"""One ONNX file per precision, so every engine is built strongly typed and the same file runs everywhere.

- ``fp32``: the exported model itself.
- ``fp16``: the model with every float tensor and weight in float16, made here by ``onnxconverter-common``
  and cached beside the engines (``<cache_dir>/onnx/<sha>-fp16-occ<version>.onnx``, with a ``.json`` sidecar
  holding the sha256 of the model it was made from and of itself, checked before every use); the uint8
  ``image`` input and the uint8 ``labels``/``confidence`` outputs stay uint8.
- ``int8``: a symmetric int8 Q/DQ model (zero point 0, float biases), given directly or found beside the fp32
  model as ``<name>_int8.onnx`` (``models/unet_camvid_int8.onnx``). It is made at export time, not here. A Q/DQ
  model given with the default ``fp32`` runs as int8 too (fp32 means "the file as it is").

TensorRT 11 has no FP16/INT8 builder flags and no calibrator; with this, 10.x and 11.x build the same way.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from unet_perception.backends.base import BackendError
from unet_perception.backends.cache_trust import atomic_write, cache_folder, require_writable
from unet_perception.backends.engine_cache import checked_bytes, file_sha256, load_sidecar

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16


def is_qdq_model(path: str | Path) -> bool:
    """True when the model has Q/DQ nodes (an int8 model); False for a file ONNX cannot read (its loader says why)."""
    try:
        import onnx
    except ImportError:  # no rosdep key for onnx: an op type is a plain string in the protobuf, so look for it
        try:
            data = Path(path).read_bytes()
        except OSError:
            return False
        return any(op.encode() in data for op in QDQ_OPS)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - DecodeError, OSError...: the runtime that loads it reports it with the path
        return False
    return any(node.op_type in QDQ_OPS for node in graph.node)


def int8_model_for(path: Path) -> Path:
    """The int8 Q/DQ model for ``path``: the file itself when it is one, else ``<stem>_int8.onnx`` beside it."""
    if is_qdq_model(path):
        return path
    sibling = path.with_name(f"{path.stem}_int8.onnx")
    if sibling.is_file() and is_qdq_model(sibling):
        return sibling
    raise BackendError(f"precision int8 needs a symmetric int8 Q/DQ model: '{path}' has no Q/DQ nodes and there is "
                       f"no '{sibling.name}' beside it. Point the model at an int8 export (e.g. "
                       "models/unet_camvid_int8.onnx) or use precision fp16")


def convert_to_fp16(model: Any) -> Any:
    """A float16 copy of the ONNX ``model`` with its uint8 I/O kept; raises BackendError when types disagree.

    onnxconverter-common converts weights and tensor types but leaves the ``to`` attribute of the model's own
    Cast nodes at float32 (the Cast after the uint8 ``image``, the one before ArgMax), which would make the
    graph mixed-typed. Those Casts are retargeted to float16 here; the Casts the converter inserts around the
    ops it keeps in float32 are left as they are. Strict type inference then checks the whole graph.
    """
    import onnx
    from onnxconverter_common import float16

    own_casts = {node.name for node in model.graph.node
                 if node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT for a in node.attribute)}
    if "" in own_casts:
        raise BackendError("the model has an unnamed Cast node; re-export it with unet-export")
    # Resize is on the converter's default block list (kept float32 between Cast pairs); on the lite U-Net's
    # decoder those pairs crash the converter's own clean-up (1.16: AttributeError in remove_unnecessary_cast_node).
    # ONNX Runtime (1.32, CPU and CUDA) and TensorRT run float16 Resize, so it is converted like the rest.
    block = [op for op in float16.DEFAULT_OP_BLOCK_LIST if op != "Resize"]
    scales = {name: copy.deepcopy(init) for name, init in _resize_scales(model).items()}
    with warnings.catch_warnings():  # one "truncated to 1e-07" line per tiny weight: nothing to act on
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    _restore_initializers(converted, scales)
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.name in own_casts:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = FLOAT16
    del converted.graph.value_info[:]
    try:
        checked = onnx.shape_inference.infer_shapes(converted, check_type=True, strict_mode=True)
        onnx.checker.check_model(checked)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BackendError(f"fp16 conversion produced an inconsistent graph ({exc}); use precision fp32") from exc
    return converted


def _resize_scales(model: Any) -> dict[str, Any]:
    """Name -> initializer of every Resize's constant scales (ONNX types them float32 in every precision)."""
    names = {node.input[2] for node in model.graph.node if node.op_type == "Resize" and len(node.input) > 2}
    return {init.name: init for init in model.graph.initializer if init.name in names}


def _restore_initializers(model: Any, originals: dict[str, Any]) -> None:
    """Put back the float32 originals of initializers the converter made float16 (a nudged scale must stay exact)."""
    for init in model.graph.initializer:
        if init.name in originals and init.data_type == FLOAT16:
            init.CopyFrom(originals[init.name])


def converter_version() -> str:
    try:
        return importlib.metadata.version("onnxconverter-common")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BackendError("precision fp16 converts the model with onnxconverter-common: pip install "
                           "onnxconverter-common (requirements/gpu.txt), or use precision fp32") from exc


def cached_fp16_problem(out: Path, sidecar: Path, source_sha256: str) -> str:
    """Why the cached fp16 file cannot be used ("" when it can): untrusted, or not the conversion of the model."""
    try:
        checked_bytes(out, sidecar, "fp16_sha256")
        made_from = load_sidecar(sidecar).get("source_sha256")
    except BackendError as exc:
        return str(exc)
    except (OSError, ValueError) as exc:
        return f"cannot read '{sidecar}': {exc}"
    return "" if made_from == source_sha256 else f"'{out}' was made from another model (sha256 {made_from})"


def fp16_model_for(path: Path, cache_dir: Path) -> Path:
    """The cached float16 conversion of ``path``, made on first use (keyed by file hash and converter version).

    A cached file is used only when it is trusted (``cache_trust``) and its sidecar records this model's sha256
    and the file's own; anything else is converted again and replaced, with a warning saying why."""
    import onnx

    if is_qdq_model(path):
        raise BackendError(f"'{path}' is an int8 Q/DQ model; use precision int8 with it, or the fp32 model for fp16")
    cache_folder(cache_dir)  # the cache folder itself first: the rules are stricter for it than for its parents
    folder = cache_folder(cache_dir / "onnx")
    source_sha256 = file_sha256(path)
    out = folder / f"{source_sha256[:24]}-fp16-occ{converter_version()}.onnx"
    sidecar = out.with_suffix(".json")
    problem = cached_fp16_problem(out, sidecar, source_sha256)
    if not problem:
        return out
    if os.path.lexists(out) or os.path.lexists(sidecar):
        logging.getLogger("unet_perception").warning(f"precision fp16: not using the cached file: {problem}; "
                                                     "converting the model again")
    require_writable(folder, f"the fp16 conversion of '{path}'")
    data = convert_to_fp16(onnx.load(str(path))).SerializeToString()
    try:
        atomic_write(out, data)
        atomic_write(sidecar, json.dumps({"source": str(path), "source_sha256": source_sha256,
                                          "fp16_sha256": hashlib.sha256(data).hexdigest(),
                                          "converter": f"onnxconverter-common {converter_version()}"}).encode())
    except OSError as exc:
        raise BackendError(f"cannot store the fp16 conversion in '{folder}': {exc.strerror or exc}") from exc
    return out


def onnx_for_precision(path: str | Path, precision: str, cache_dir: Path) -> tuple[Path, str]:
    """The ONNX file that carries ``precision`` for the model at ``path``, and the precision it runs at.

    A Q/DQ model is int8 by construction: with the default ``fp32`` (run the file as it is) or ``int8`` it runs
    as int8, so pointing ``model_path`` at ``unet_camvid_int8.onnx`` is enough; ``fp16`` is refused.
    """
    path = Path(path)
    if precision == "fp16":
        return fp16_model_for(path, cache_dir), "fp16"
    if precision == "int8":
        return int8_model_for(path), "int8"
    return path, "int8" if is_qdq_model(path) else "fp32"
