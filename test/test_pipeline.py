"""pipeline: resizes match training, the Segmenter batches any count and sizes, and its labels equal eager torch
(with the weights, on frames resized by cv2 in the test) on the same frames."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA, make_tiny_unet
from reference import back_to_frame, resize_to_model

from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.backends.onnxruntime import OnnxRuntimeBackend
from unet_perception.class_table import load_class_table
from unet_perception.pipeline import Segmenter, blend, colorize, preprocess, upscale_labels

RNG = np.random.default_rng(1)


def smooth_frame(h: int, w: int) -> np.ndarray:
    """A blurred random RGB frame: large regions like a real scene, so labels are not salt and pepper."""
    return cv2.GaussianBlur(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 4)


def test_preprocess_resizes_bilinearly_and_keeps_frames_already_at_size() -> None:
    frames = [smooth_frame(100, 130), smooth_frame(32, 48), smooth_frame(20, 20)]
    batch = preprocess(frames, (32, 48))
    assert batch.shape == (3, 32, 48, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], cv2.resize(frames[0], (48, 32), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(batch[1], frames[1])
    np.testing.assert_array_equal(batch[2], cv2.resize(frames[2], (48, 32), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("frames, match", [
    ([], "at least one frame"),
    ([np.zeros((4, 4), np.uint8)], r"frame 0 must be a uint8 \[H, W, 3\] RGB array.*\[4, 4\]"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 4), np.uint8)], r"frame 1 .*\[4, 4, 4\]"),
    ([np.zeros((4, 4, 3), np.float32)], "got float32"),
])
def test_preprocess_rejects_bad_frames(frames: list[np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preprocess(frames, (8, 8))


def test_upscale_is_nearest_and_never_invents_ids() -> None:
    small = RNG.integers(0, 11, (24, 32), dtype=np.uint8)
    big = upscale_labels(small, (480, 640))
    np.testing.assert_array_equal(big, np.repeat(np.repeat(small, 20, 0), 20, 1))
    odd = upscale_labels(small, (37, 53))
    assert odd.shape == (37, 53) and set(np.unique(odd)) <= set(np.unique(small))
    np.testing.assert_array_equal(odd, cv2.resize(small, (53, 37), interpolation=cv2.INTER_NEAREST))
    assert upscale_labels(small, (24, 32)) is small


def test_colorize_maps_ids_through_the_palette() -> None:
    table = load_class_table("camvid")
    labels = np.array([[0, 3], [10, 200]], np.uint8)
    out = colorize(labels, table.palette())
    assert out.tolist() == [[list(table.colors[0]), list(table.colors[3])], [list(table.colors[10]), [0, 0, 0]]]
    with pytest.raises(ValueError, match=r"palette must be uint8 \[256, 3\]"):
        colorize(labels, np.zeros((11, 3), np.uint8))


def test_blend_weights_image_and_colour() -> None:
    image = np.full((2, 3, 3), 100, np.uint8)
    color = np.full((2, 3, 3), 201, np.uint8)
    np.testing.assert_array_equal(blend(image, color, 0.0), image)
    np.testing.assert_array_equal(blend(image, color, 1.0), color)
    np.testing.assert_array_equal(blend(image, color, 0.5), np.full((2, 3, 3), 150, np.uint8))  # 150.5 rounds
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
        blend(image, color, 1.5)
    with pytest.raises(ValueError, match=r"cannot blend image \[2, 3, 3\] with colour labels \[3, 2, 3\]"):
        blend(image, color.reshape(3, 2, 3), 0.5)


@pytest.fixture(scope="module")
def segmenter(tiny_model: Path) -> Segmenter:
    backend = create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=3))
    return Segmenter(backend, backend.info.classes)


def test_run_chunks_any_count_of_mixed_sizes(segmenter: Segmenter, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [(32, 48), (480, 640), (17, 29), (360, 480), (32, 48), (100, 60), (64, 96)]
    frames = [smooth_frame(h, w) for h, w in sizes]
    singles = [segmenter.run([f])[0].labels for f in frames]
    batches: list[int] = []
    infer = segmenter.backend._infer
    monkeypatch.setattr(segmenter.backend, "_infer", lambda b: batches.append(len(b)) or infer(b))
    labels = [s.labels for s in segmenter.run(frames)]
    assert batches == [3, 3, 1]
    assert [lab.shape for lab in labels] == sizes and all(lab.dtype == np.uint8 for lab in labels)
    for lab, single in zip(labels, singles):
        np.testing.assert_array_equal(lab, single)  # batching never changes a frame's labels
    assert len(np.unique(labels[1])) > 1, "the test model should not paint one class everywhere"
    assert segmenter.run([]) == []


def test_outputs_colour_and_overlay(segmenter: Segmenter) -> None:
    frame = smooth_frame(40, 50)
    labels = segmenter.run([frame])[0].labels
    both = segmenter.outputs(frame, labels, alpha=0.25)
    assert both.color is not None and both.overlay is not None
    np.testing.assert_array_equal(both.color, segmenter.palette[labels])
    np.testing.assert_array_equal(both.overlay, blend(frame, both.color, 0.25))
    bgr = segmenter.outputs(frame, labels, color=False, alpha=0.25, overlay_bgr=True)
    assert bgr.color is None and bgr.overlay is not None
    np.testing.assert_array_equal(bgr.overlay, both.overlay[:, :, ::-1])
    only_color = segmenter.outputs(frame, labels, overlay=False)
    assert only_color.overlay is None and only_color.color is not None
    nothing = segmenter.outputs(frame, labels, color=False, overlay=False)
    assert nothing.color is None and nothing.overlay is None


def parity_frames() -> tuple[list[np.ndarray], str]:
    val = sorted((DATA / "camvid" / "val").glob("*.png"))[:3]
    if not val:
        return [smooth_frame(360, 480), smooth_frame(480, 640), smooth_frame(123, 201)], "synthetic frames"
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in val]
    return frames + [frames[0][40:163, 100:301].copy()], "CamVid val frames"


def test_segmenter_labels_equal_training_predict_labels(tmp_path: Path) -> None:
    """The reference is eager torch on frames resized here with cv2 (bilinear down, nearest back up): not
    ``predict_labels``, which calls ``pipeline.preprocess`` itself and so would share any bug in it."""
    torch = pytest.importorskip("torch")
    from unet_perception.training.export import export_onnx

    model, table = make_tiny_unet("camvid", width=4, seed=3)
    input_hw = (64, 96)
    path = export_onnx(model, tmp_path / "parity.onnx", table, input_hw)
    frames, what = parity_frames()
    expected = []
    with torch.inference_mode():
        for frame in frames:
            small = resize_to_model(frame, input_hw)
            x = torch.from_numpy(small).float().permute(2, 0, 1)[None] / 255.0  # the contract: RGB in [0, 1]
            expected.append(back_to_frame(model(x).argmax(1)[0].to(torch.uint8).numpy(), frame.shape[:2]))
    with create_backend("onnxruntime", path, BackendOptions(max_batch=2)) as backend:
        assert isinstance(backend, OnnxRuntimeBackend)
        got = [s.labels for s in Segmenter(backend, table).run(frames)]
    assert [g.shape for g in got] == [f.shape[:2] for f in frames]
    agreement = share_equal(got, expected)
    assert agreement >= 0.999, f"torch vs ONNX Runtime labels agree on {agreement:.4%} of {what}"
    assert len(np.unique(np.concatenate([e.ravel() for e in expected]))) > 1
    # unet-evaluate and training score with predict_labels: it must be the same eager path (batched: float
    # kernels may differ by an ulp from the one-frame runs above, hence agreement, not equality)
    from unet_perception.training.engine import predict_labels

    scored = share_equal(predict_labels(model, frames, input_hw, torch.device("cpu")), expected)
    assert scored >= 0.999, f"predict_labels agrees with the reference on {scored:.4%} of {what}"


def share_equal(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate([(g == e).ravel() for g, e in zip(got, expected, strict=True)])))
