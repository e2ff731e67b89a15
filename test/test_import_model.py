"""unet-import on hostile and unusual sources: one error line and nothing written; detection; 255 classes; NHWC.

Planted and seen failing: the std-0 check removed (the import divided by zero and wrote a file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from foreign_models import ArgmaxLike, MmsegLike, SmpUnetLike, export
from torch import nn

from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules
from unet_perception.tools.import_model import main, synthetic_frames

HW = (32, 48)


@pytest.fixture(scope="module")
def mmseg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return export(MmsegLike(19), tmp_path_factory.mktemp("src") / "mm.onnx", HW)


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def run_bad(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unet-import: "), err
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))
    return err


@pytest.mark.parametrize("extra, words", [
    (["--classes", "camvid"], "has 19 classes"),
    (["--classes", "cityscapes", "--mean", "nan", "0", "0"], "finite"),
    (["--classes", "cityscapes", "--std", "58", "0", "57"], "divides by zero"),
    (["--classes", "cityscapes", "--input-size", "64x96"], "fixed at 32x48"),
    (["--classes", "nosuchtable"], "unknown dataset"),
    (["--classes", "cityscapes", "--layout", "nhwc"], "--layout nhwc"),
])
def test_bad_options_are_one_line(mmseg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  extra: list[str], words: str) -> None:
    out = tmp_path / "out.onnx"
    assert words in run_bad([str(mmseg), str(out), *extra], out, capsys)


def test_bad_models_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    assert "not a readable ONNX model" in run_bad([str(junk), str(out), "--classes", "camvid"], out, capsys)
    two = tmp_path / "two.onnx"
    with torch.inference_mode():
        torch.onnx.export(TwoInputs(), (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)), str(two),
                          input_names=["a", "b"], dynamo=False)
    assert "2 inputs" in run_bad([str(two), str(out), "--classes", "camvid"], out, capsys)
    cls = export(Classifier(), tmp_path / "cls.onnx", (8, 8))
    assert "classifier" in run_bad([str(cls), str(out), "--classes", "camvid"], out, capsys)


def test_labels_only_model_has_no_confidence_and_is_checked(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = export(ArgmaxLike(11), tmp_path / "argmax.onnx", HW)
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--classes", "camvid"]) == 0
    info = read_model_info(out)
    assert not info.has_confidence
    assert json.loads(info.metadata["imported"])["confidence"].startswith("none")
    assert check_tensorrt_rules(out) == []


def test_labels_beyond_the_table_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(1)
    src = export(ArgmaxLike(40), tmp_path / "argmax40.onnx", HW)
    out = tmp_path / "out.onnx"
    assert "give the right --classes" in run_bad([str(src), str(out), "--classes", "camvid"], out, capsys)


class NhwcLike(nn.Module):
    """A TensorFlow/TAO-style model: NHWC float input, NHWC logits at 1/2."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, classes, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def test_nhwc_model_with_255_classes_from_a_json_table(tmp_path: Path) -> None:
    """Layout detected from the input, logits found on the last axis, 255 classes from a class-table file."""
    table = {"name": "many", "classes": [{"id": i, "name": f"c{i}", "color": [i, 255 - i, (7 * i) % 256]}
                                         for i in range(255)]}
    (tmp_path / "many.json").write_text(json.dumps(table))
    torch.manual_seed(2)
    model = NhwcLike(255).eval()
    src = tmp_path / "nhwc.onnx"
    with torch.inference_mode():
        torch.onnx.export(model, (torch.zeros(1, *HW, 3),), str(src), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--classes", str(tmp_path / "many.json"), "--std", "255", "255", "255"]) == 0
    info = read_model_info(out)
    assert info.classes.num_classes == 255 and json.loads(info.metadata["imported"])["layout"] == "nhwc"
    frames = synthetic_frames(HW, 2, seed=5)
    with torch.inference_mode():
        logits = model(torch.from_numpy(frames.astype(np.float32) / 255.0)).permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(logits, size=HW, mode="bilinear", align_corners=False).argmax(1)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_NAME, CONFIDENCE_NAME], {INPUT_NAME: frames})[0]
    assert (got == want.numpy()).mean() >= 0.995


def test_check_images_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.png"), synthetic_frames((60, 80), 1, seed=i)[0])
    torch.manual_seed(0)
    src = export(SmpUnetLike(11), tmp_path / "smp.onnx", HW)
    assert main([str(src), str(tmp_path / "o.onnx"), "--classes", "camvid", "--check-images", str(folder)]) == 0
    assert f"2 frames of {folder}" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "o2.onnx"
    assert "no image files" in run_bad([str(src), str(out), "--classes", "camvid", "--check-images", str(empty)],
                                       out, capsys)


def test_fixed_batch_source_says_max_batch_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    src = tmp_path / "b1.onnx"
    with torch.inference_mode():
        torch.onnx.export(SmpUnetLike(11).eval(), (torch.zeros(1, 3, *HW),), str(src), input_names=["input"],
                          opset_version=17, dynamo=False)
    assert main([str(src), str(tmp_path / "o.onnx"), "--classes", "camvid"]) == 0
    assert "fixed batch of 1: run it with max_batch 1" in capsys.readouterr().out
    assert [d.dim_value for d in onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape.dim] == \
        [1, *HW, 3]


class SoftmaxLike(nn.Module):
    """A model exported with its softmax, probabilities at 1/2 of the input."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, classes, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(1)


def test_probabilities_are_detected_resized_and_give_the_confidence(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = SoftmaxLike(11).eval()
    src = export(model, tmp_path / "soft.onnx", HW)
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--classes", "camvid", "--std", "255", "255", "255"]) == 0
    assert json.loads(read_model_info(out).metadata["imported"])["output"] == "probabilities"
    frames = synthetic_frames(HW, 2, seed=8)
    with torch.inference_mode():
        probs = model(torch.from_numpy(frames.astype(np.float32).transpose(0, 3, 1, 2) / 255.0))
        probs = torch.nn.functional.interpolate(probs, size=HW, mode="bilinear", align_corners=False)
    labels, conf = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        [OUTPUT_NAME, CONFIDENCE_NAME], {INPUT_NAME: frames})
    assert (labels == probs.argmax(1).numpy()).mean() >= 0.995
    assert np.abs(conf.astype(np.float32) - probs.amax(1).numpy() * 255).max() <= 1.0
