"""Torch backend: a training checkpoint behind the backend interface agrees with ONNX Runtime on the exported model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet

from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.backends.torch_backend import TorchBackend, unavailable_reason
from unet_perception.model_contract import read_model_info
from unet_perception.training.export import export_onnx

HW = (32, 48)


def save_checkpoint(path: Path, dataset: str = "camvid", seed: int = 0) -> torch.nn.Module:
    """A checkpoint dict with the keys train.py writes (the ones load_checkpoint/checkpoint_table read)."""
    model, table = make_tiny_unet(dataset, seed=seed)
    torch.save({"model": model.state_dict(), "model_config": model.config, "epoch": 0,
                "args": {"dataset": dataset, "input_size": list(HW)}, "dataset": table.name,
                "class_table": json.loads(table.to_json()), "ignore_index": table.ignore_index,
                "layout": table.layout, "input_size": list(HW), "history": []}, path)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny.onnx`` exported from the model saved as ``tiny.pt`` beside it."""
    folder = tmp_path_factory.mktemp("torch_backend")
    model = save_checkpoint(folder / "tiny.pt")
    from unet_perception.class_table import load_class_table

    return export_onnx(model, folder / "tiny.onnx", load_class_table("camvid"), HW)


def test_torch_matches_onnxruntime(exported: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, *HW, 3), dtype=np.uint8)
    options = BackendOptions(max_batch=3)
    with create_backend("torch", exported, options) as torch_backend, \
            create_backend("onnxruntime", exported, options) as ort_backend:
        assert torch_backend.name == "torch" and torch_backend.device == "cpu"
        got, want = torch_backend.infer(frames).labels, ort_backend.infer(frames).labels
    assert got.shape == (3, *HW) and got.dtype == np.uint8
    assert len(np.unique(want)) > 1  # a random net that does not predict one class everywhere
    assert (got == want).mean() >= 0.999
    np.testing.assert_array_equal(torch_backend.infer(frames[:1]).labels, got[:1])  # reactivates after close


def test_explicit_checkpoint_and_missing_one(exported: Path, tmp_path: Path) -> None:
    info = read_model_info(exported)
    TorchBackend(info, BackendOptions(checkpoint=str(exported.with_suffix(".pt"))))
    with pytest.raises(BackendError, match="checkpoint '.*nope.pt' does not exist"):
        TorchBackend(info, BackendOptions(checkpoint=str(tmp_path / "nope.pt")))


def test_checkpoint_with_other_classes_is_refused(exported: Path, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "carla.pt", "carla")
    backend = TorchBackend(read_model_info(exported), BackendOptions(checkpoint=str(tmp_path / "carla.pt")))
    with pytest.raises(BackendError, match="has classes .* pass the checkpoint it was exported from"):
        backend.activate()


def test_device_and_availability(exported: Path) -> None:
    with pytest.raises(BackendError, match="device must be one of \\('cpu', 'cuda'\\)"):
        TorchBackend(read_model_info(exported), BackendOptions(device="tensorrt"))
    for device, precision in (("cpu", "fp16"), ("cpu", "int8"), ("cuda", "int8")):
        with pytest.raises(BackendError, match=f"precision '{precision}' on device '{device}' is not one of them"):
            TorchBackend(read_model_info(exported), BackendOptions(device=device, precision=precision))
    assert unavailable_reason(BackendOptions(device="cpu")) is None
    reason = unavailable_reason(BackendOptions(device="cuda"))
    assert (reason is None) == torch.cuda.is_available()
    if reason is not None:
        assert reason.startswith("CUDA asked but torch")


def test_fp32_on_cuda_turns_tf32_convolutions_off_inside_the_block() -> None:
    """torch's cuDNN convs default to TF32; the parity backend runs them in IEEE fp32 and restores the setting."""
    from unet_perception.backends.torch_backend import ieee_fp32_convs

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with ieee_fp32_convs():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
