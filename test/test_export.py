"""Export to the ONNX contract: parity with torch on real frames, metadata, dynamic batch, the CLI's checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import DATA, make_tiny_unet

from unet_perception import __version__
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, read_model_info
from unet_perception.training import export, train
from unet_perception.torch_contract import ContractWrapper, checkpoint_table
from unet_perception.training.export import (
    check_frames,
    export_onnx,
    label_agreement,
)

CAMVID = DATA / "camvid"
needs_camvid = pytest.mark.skipif(not (CAMVID / "val.txt").is_file(),
                                  reason=f"CamVid is not at {CAMVID} (see ../shared/data/README.md)")
HW = (48, 64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model, table = make_tiny_unet("camvid", width=4, seed=1)
    path = export_onnx(model, tmp_path_factory.mktemp("export") / "tiny.onnx", table, HW,
                       metrics={"mean_iou": 0.5}, training={"epochs": 3, "dataset": "camvid"})
    return model, path


def test_export_leaves_the_model_in_eval_mode(exported: tuple[torch.nn.Module, Path]) -> None:
    # The exporter restores the wrapper's mode afterwards; a train-mode wrapper would switch the
    # caller's model to training (dropout on, batch norm updating its statistics).
    model, _ = exported
    assert not any(m.training for m in model.modules())


@needs_camvid
def test_onnx_labels_match_torch_on_real_frames(exported: tuple[torch.nn.Module, Path]) -> None:
    model, path = exported
    table = make_tiny_unet("camvid")[1]
    frames, what = check_frames(str(CAMVID), table, HW, count=6)
    assert frames.shape == (6, *HW, 3) and "6 val frames" in what
    with torch.inference_mode():
        torch_labels = ContractWrapper(model)(torch.from_numpy(frames))[0].numpy()
    assert len(np.unique(torch_labels)) > 2  # a real comparison, not one class everywhere
    assert label_agreement(model, path, frames) >= export.MIN_AGREEMENT


def test_metadata_round_trips_through_read_model_info(exported: tuple[torch.nn.Module, Path]) -> None:
    _, path = exported
    table = make_tiny_unet("camvid")[1]
    info = read_model_info(path)
    assert info.input_hw == HW
    assert info.classes.names == table.names and info.classes.colors == table.colors
    assert info.classes.ignore_index == 11 and info.classes.name == "camvid"
    assert info.metrics == {"mean_iou": 0.5}
    assert json.loads(info.metadata["training"]) == {"epochs": 3, "dataset": "camvid"}
    assert info.metadata["version"] == __version__


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_axis_is_dynamic_and_io_follows_the_contract(exported: tuple[torch.nn.Module, Path],
                                                           batch: int) -> None:
    _, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out, conf) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == (INPUT_NAME, "tensor(uint8)", [*HW, 3])
    assert (out.name, out.type, out.shape[1:]) == (OUTPUT_NAME, "tensor(uint8)", list(HW))
    assert (conf.name, conf.type, conf.shape[1:]) == (CONFIDENCE_NAME, "tensor(uint8)", list(HW))
    frames = np.random.default_rng(batch).integers(0, 256, (batch, *HW, 3), dtype=np.uint8)
    labels, confidence = session.run([OUTPUT_NAME, CONFIDENCE_NAME], {INPUT_NAME: frames})
    assert labels.shape == (batch, *HW) and labels.dtype == np.uint8 and labels.max() < 11
    # the winning class of 11 has probability >= 1/11, i.e. confidence >= 23
    assert confidence.shape == labels.shape and confidence.dtype == np.uint8 and confidence.min() >= 23
    # Frames are independent: frame 0 alone gets the labels it gets inside the batch.
    alone = session.run([OUTPUT_NAME], {INPUT_NAME: frames[:1]})[0]
    np.testing.assert_array_equal(alone[0], labels[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (CAMVID / "train.txt").is_file():
        pytest.skip(f"CamVid is not at {CAMVID}")
    out = tmp_path_factory.mktemp("ckpt")
    assert train.main(["--dataset", "camvid", "--data", str(CAMVID), "--out", str(out), "--input-size", "32x48",
                       "--epochs", "1", "--batch-size", "4", "--limit", "4", "--decoder", "16,16,8,8",
                       "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    return out / "best.pt"


def test_export_cli_writes_a_checked_model_with_training_metadata(checkpoint: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "m.onnx"
    assert export.main([str(checkpoint), str(out), "--check-data", str(CAMVID), "--check-frames", "3"]) == 0
    assert "agree on" in capsys.readouterr().out
    info = read_model_info(out)
    ckpt = torch.load(checkpoint, weights_only=False)
    assert info.input_hw == (32, 48) and info.classes.num_classes == 11
    assert info.metrics["mean_iou"] == pytest.approx(ckpt["best_miou"])
    training = json.loads(info.metadata["training"])
    # the architecture and the class table travel with the model file
    assert training["epochs_trained"] == 1
    assert training["model_config"] == {"arch": "lite", "num_classes": 11, "encoder": "lite0",
                                        "decoder": [16, 16, 8, 8]}
    assert info.classes == checkpoint_table(ckpt)
    assert not list(out.parent.glob("*.tmp"))


def test_export_cli_fails_loudly_when_runtimes_disagree(checkpoint: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(export, "label_agreement", lambda *_: 0.95)
    out = tmp_path / "m.onnx"
    assert export.main([str(checkpoint), str(out), "--check-frames", "2"]) != 0
    assert not out.exists()  # never a wrong model under the name the node loads
    assert "below 99.9%" in capsys.readouterr().err


def test_export_cli_names_a_missing_or_foreign_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    for name, words in (("nope.pt", "does not exist"), ("junk.pt", "is not a unet-train checkpoint"),
                        ("other.pt", "is not a unet-train checkpoint")):
        assert export.main([str(tmp_path / name), str(tmp_path / "m.onnx")]) == 1  # was: a traceback
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("unet-export: error: ") and name in err and words in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_export_at_another_input_size(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m_64x96.onnx"
    assert export.main([str(checkpoint), str(out), "--input-size", "64x96", "--check-frames", "2"]) == 0
    assert read_model_info(out).input_hw == (64, 96)  # the metadata says the size the graph takes
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    labels = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((1, 64, 96, 3), np.uint8)})[0]
    assert labels.shape == (1, 64, 96)
    with pytest.raises(SystemExit):
        export.main([str(checkpoint), str(tmp_path / "bad.onnx"), "--input-size", "60x90"])
