"""An imported model through the other precisions and tools: the fp16 conversion and int8 quantization keep
TensorRT's rules (static H and W, ArgMax -> Cast(float) -> Cast(uint8)), the engine builder (fake TensorRT) builds
each precision, and unet-evaluate scores it on CamVid val.

Planted and seen failing: Resize scales left float16 by the fp16 conversion (an invalid graph, BackendError).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import DATA
from fake_tensorrt import FakeBuilder, HostCuda
from foreign_models import MmsegLike, SmpUnetLike, export

from unet_perception.backends import precision_onnx as po
from unet_perception.backends import tensorrt_builder as tb
from unet_perception.backends.factory import BackendOptions
from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules
from unet_perception.tools.import_model import main, synthetic_frames

HW = (40, 56)  # 1/4 logits at 10x14
CAMVID = DATA / "camvid"


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("everywhere")
    torch.manual_seed(4)
    source = export(MmsegLike(19), folder / "mm.onnx", HW, dynamic_hw=True)
    out = folder / "city.onnx"
    assert main([str(source), str(out), "--classes", "cityscapes", "--input-size", "40x56",
                 "--mean", "123.675", "116.28", "103.53", "--std", "58.395", "57.12", "57.375"]) == 0
    return out


def labels(path: Path, frames: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: frames})[0]


def test_fp16_and_int8_of_an_imported_model_keep_the_rules(imported: Path, tmp_path: Path) -> None:
    from unet_perception.training.quantize import quantize

    frames = synthetic_frames(HW, 4, seed=11)
    fp16, _ = po.onnx_for_precision(imported, "fp16", tmp_path)
    int8 = quantize(imported, tmp_path / "city_int8.onnx", list(frames))
    reference = labels(imported, frames)
    for path, least in ((fp16, 0.98), (int8, 0.95)):  # int8 measured 99.8% of fp32 here
        assert check_tensorrt_rules(path) == [], path.name
        got = labels(path, frames)
        assert got.shape == reference.shape and (got == reference).mean() >= least, path.name


def test_engine_builder_builds_each_precision_of_an_imported_model(imported: Path, tmp_path: Path) -> None:
    from unet_perception.training.quantize import quantize

    model = tmp_path / "city.onnx"
    model.write_bytes(imported.read_bytes())
    quantize(model, tmp_path / "city_int8.onnx", list(synthetic_frames(HW, 2, seed=1)))
    info, builder = read_model_info(model), FakeBuilder()
    options = BackendOptions(device="cuda", engine_cache_dir=str(tmp_path / "cache"))
    for precision in ("fp32", "fp16", "int8"):
        tb.engine_for(info, replace(options, precision=precision), HostCuda(), print, "10.13.0.35", builder)
    assert [b.precision for b in builder.builds] == ["fp32", "fp16", "int8"]


@pytest.mark.skipif(not (CAMVID / "val.txt").is_file(), reason=f"CamVid is not at {CAMVID}")
def test_unet_evaluate_scores_an_imported_model(tmp_path: Path) -> None:
    from unet_perception.training.evaluate import main as evaluate

    torch.manual_seed(5)
    source = export(SmpUnetLike(11), tmp_path / "smp.onnx", (64, 96))
    model = tmp_path / "smp_camvid.onnx"
    assert main([str(source), str(model), "--classes", "camvid", "--std", "255", "255", "255"]) == 0
    assert evaluate([str(model), "--data", str(CAMVID), "--out", str(tmp_path / "eval"), "--limit", "2",
                     "--samples", "0"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert 0.0 <= report["mean_iou"] <= 1.0 and report["frames"] == 2
