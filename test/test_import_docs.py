"""docs/models.md: every `unet-import` line, run on a small untrained stand-in of the framework's model, and the
imported labels checked against the torch model run eagerly (a reference that never touches our ONNX code); every
`torch.onnx.export` snippet of docs/ run as written on the stand-in, its file imported by the documented line.

Planted and seen failing: nearest instead of bilinear logits resize (the 1/4-stride mmseg line), no BGR swap (the
mmseg line), the INT64 -> UINT8 labels cast (every line, through check_tensorrt_rules).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from foreign_models import ArgmaxLike, MmsegLike, SmpUnetLike, TorchvisionLike, export

from unet_perception.class_table import load_class_table
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules
from unet_perception.tools.import_model import main, synthetic_frames

DOC = REPO / "docs" / "models.md"
# source file named in the docs -> (stand-in, its classes, export size, dynamic H/W, output names, opset)
STANDINS = {
    "torchvision_deeplab.onnx": (TorchvisionLike, "cityscapes", (64, 96), True, ["out", "aux"], 17),
    "smp_unet.onnx": (SmpUnetLike, "camvid", (64, 96), False, None, 17),
    "mmseg_model.onnx": (MmsegLike, "ade20k", (48, 80), True, None, 11),  # mmseg's exports default to opset 11
    "paddle_argmax.onnx": (ArgmaxLike, "camvid", (64, 96), False, None, 17),
}


def doc_lines() -> list[list[str]]:
    return [shlex.split(line) for line in DOC.read_text().splitlines()
            if line.startswith("unet-import ") and "IN.onnx" not in line]


def test_docs_name_every_framework() -> None:
    assert sorted(args[1] for args in doc_lines()) == sorted(STANDINS)


def export_snippets() -> list[str]:
    """The ```python blocks of docs/ that call torch.onnx.export."""
    blocks = [block.split("```", 1)[0] for doc in sorted((REPO / "docs").glob("*.md"))
              for block in doc.read_text().split("```python\n")[1:]]
    return [block for block in blocks if "torch.onnx.export(" in block]


@pytest.mark.parametrize("snippet", export_snippets(), ids=lambda s: re.findall(r'"(\w+\.onnx)"', s)[0])
def test_documented_export_runs_and_imports(snippet: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each export snippet as written, with `model` the framework's stand-in, in this venv's torch (2.13: the dynamo
    exporter by default, which needs onnxscript); then its file through the documented unet-import line."""
    (name,) = re.findall(r'"(\w+\.onnx)"', snippet)
    cls, dataset = STANDINS[name][:2]
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    exec(snippet, {"torch": torch, "model": cls(load_class_table(dataset).num_classes)})  # noqa: S102
    (argv,) = [a for a in doc_lines() if a[1] == name]
    assert main([str(tmp_path / name), str(tmp_path / argv[2]), *argv[3:]]) == 0


def torch_reference(model: torch.nn.Module, frames: np.ndarray, argv: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence x 255 from the eager torch model: preprocessing by hand, bilinear resize, softmax."""
    opt = {argv[i]: argv[i + 1:i + 4] for i in range(len(argv)) if argv[i] in ("--mean", "--std")}
    mean = np.array([float(v) for v in opt.get("--mean", [0, 0, 0])], np.float32)
    std = np.array([float(v) for v in opt.get("--std", [1, 1, 1])], np.float32)
    x = (frames.astype(np.float32) - mean) / std
    if "bgr" in argv:
        x = x[..., ::-1]
    with torch.inference_mode():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        out = out["out"] if isinstance(out, dict) else out
        if out.dtype == torch.int64:
            return out.numpy(), np.zeros(0)
        out = F.interpolate(out, size=frames.shape[1:3], mode="bilinear", align_corners=False)
        return out.argmax(1).numpy(), (out.softmax(1).amax(1) * 255).numpy()


@pytest.mark.parametrize("argv", doc_lines(), ids=lambda a: a[1])
def test_documented_line_imports_and_matches_torch(argv: list[str], tmp_path: Path) -> None:
    cls, dataset, hw, dynamic, names, opset = STANDINS[argv[1]]
    table = load_class_table(dataset)
    torch.manual_seed(0)
    model = cls(table.num_classes).eval()
    source = export(model, tmp_path / argv[1], hw, dynamic_hw=dynamic, output_names=names, opset=opset)
    out = tmp_path / argv[2]
    assert main([str(source), str(out), *argv[3:]]) == 0

    info = read_model_info(out)
    size = tuple(int(v) for v in argv[argv.index("--input-size") + 1].split("x")) if dynamic else hw
    assert info.input_hw == size and info.classes.names == table.names
    assert info.has_confidence == (cls is not ArgmaxLike)
    imported = json.loads(info.metadata["imported"])
    assert imported["source"] == argv[1] and len(imported["sha256"]) == 64
    assert check_tensorrt_rules(out) == []
    graph = onnx.load(str(out)).graph
    for o in graph.output:  # static H and W in the file itself
        assert [d.dim_value for d in o.type.tensor_type.shape.dim[1:]] == list(size)

    frames = synthetic_frames(size, 3, seed=7)
    want_labels, want_conf = torch_reference(model, frames, argv)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    fetch = [OUTPUT_NAME, CONFIDENCE_NAME] if info.has_confidence else [OUTPUT_NAME]
    got = session.run(fetch, {INPUT_NAME: frames})
    assert len(np.unique(want_labels)) > 2, "the stand-in must give several classes for the check to mean anything"
    assert (got[0] == want_labels).mean() >= 0.995
    if info.has_confidence:
        assert np.abs(got[1].astype(np.float32) - want_conf).max() <= 1.0


def test_the_contract_section_names_what_the_code_writes() -> None:
    """docs/models.md states the model contract in the repository (it pointed at a DESIGN.md the repository does
    not have): the tensor names, the metadata format and every metadata key export writes."""
    from unet_perception.class_table import METADATA_FORMAT, load_class_table
    from unet_perception.model_contract import make_metadata

    text = DOC.read_text()
    assert "## The model contract" in text and "(#the-model-contract)" in text
    section = text.split("## The model contract", 1)[1].split("\n## ", 1)[0]
    keys = make_metadata(load_class_table("camvid"), (8, 8))
    names = [INPUT_NAME, OUTPUT_NAME, CONFIDENCE_NAME, METADATA_FORMAT, *keys]
    assert [n for n in names if f"`{n}`" not in section] == []
