"""The retrofit surgery's command line (named by check_tensorrt_rules' messages): a model that is already
TensorRT-ready keeps its labels, an unreadable one is one error line, and nothing but OUT is ever written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, read_model_info
from unet_perception.training.retrofit import main


def labels(path: Path, frames: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: frames})[0])


def test_a_ready_model_keeps_its_labels_and_metadata(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "new.onnx"
    bystander = tmp_path / "new.onnx.new"  # the old fixed staging name: not ours to overwrite or delete
    bystander.write_bytes(b"mine")
    assert main([str(tiny_model), str(out)]) == 0
    frames = np.random.default_rng(3).integers(0, 256, (2, *read_model_info(tiny_model).input_hw, 3), np.uint8)
    assert np.array_equal(labels(out, frames), labels(tiny_model, frames))
    assert read_model_info(out).metadata == read_model_info(tiny_model).metadata
    assert bystander.read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["new.onnx", "new.onnx.new"]


@pytest.mark.parametrize("content", [None, b"\x00not a model"])
def test_an_unreadable_model_is_one_line(tmp_path: Path, content: bytes | None,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "old.onnx"
    if content is not None:
        src.write_bytes(content)
    assert main([str(src), str(tmp_path / "new.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: retrofit: ") and "old.onnx" in err, err
    assert os.listdir(tmp_path) == ([] if content is None else ["old.onnx"])


@pytest.mark.parametrize("out", ["a_file/new.onnx", "a_folder"])
def test_an_output_that_cannot_be_written_is_said_before_the_check(tiny_model: Path, tmp_path: Path, out: str,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import unet_perception.training.retrofit as retrofit

    def no_check(*_: object) -> np.ndarray:
        raise AssertionError("the label check ran before the output was found unwritable")

    monkeypatch.setattr(retrofit, "labels_of", no_check)
    (tmp_path / "a_file").write_bytes(b"")
    (tmp_path / "a_folder").mkdir()
    assert main([str(tiny_model), str(tmp_path / out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: retrofit: ") and out.split("/")[0] in err and err.endswith("nothing written"), err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"] and not os.listdir(tmp_path / "a_folder")


def test_a_surgery_that_changes_the_labels_writes_nothing(tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import unet_perception.training.retrofit as retrofit

    real = retrofit.labels_of

    def changed(model: Path | bytes, frames: np.ndarray, basic: bool) -> np.ndarray:
        got = real(model, frames, basic)
        return got + 1 if isinstance(model, bytes) else got  # the new graph (in memory) labels differently

    monkeypatch.setattr(retrofit, "labels_of", changed)
    out = tmp_path / "made" / "for_it" / "new.onnx"  # the folders made for the output go again too
    assert main([str(tiny_model), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: retrofit: the surgery changed what the graph computes; nothing written", err
    assert os.listdir(tmp_path) == []
