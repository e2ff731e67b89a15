"""unet-bag on bad input: a clear error, a non-zero exit, and nothing at OUT that looks like a bag."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin, Writer

from unet_perception.tools import bag
from unet_perception.tools.bag import IMAGE, BagError, label_bag, typestore
from unet_perception.tools.bag_cli import main

START = 1_700_000_000_000_000_000


def _camera_bag(path: Path, storage: StoragePlugin = StoragePlugin.SQLITE3, n: int = 40) -> Path:
    store = typestore()
    frame = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    with Writer(path, version=8, storage_plugin=storage) as w:
        conn = w.add_connection("/camera/image_raw", IMAGE, typestore=store)
        for i in range(n):
            header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START + i), frame_id="c")
            w.write(conn, START + i, store.serialize_cdr(bag.image_message(store, frame, "rgb8", header), IMAGE))
    return path


def _no_output(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def _label(tmp_path: Path, src: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(model), "--backend", "onnxruntime"]) == 1
    _no_output(tmp_path, out)
    return capsys.readouterr().err


def test_missing_path(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _label(tmp_path, tmp_path / "nope", tiny_model, capsys)
    assert "no bag at" in err and "nope" in err
    assert main(["play", str(tmp_path / "nope")]) == 1
    assert "no bag at" in capsys.readouterr().err


@pytest.mark.parametrize("storage,suffix", [(StoragePlugin.SQLITE3, "db3"), (StoragePlugin.MCAP, "mcap")],
                         ids=["sqlite3", "mcap"])
def test_truncated_bag(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str],
                       storage: StoragePlugin, suffix: str) -> None:
    src = _camera_bag(tmp_path / "in", storage)
    data = src / f"in.{suffix}"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    err = _label(tmp_path, src, tiny_model, capsys)
    assert "Traceback" not in err
    reason = {"db3": f"Cannot open database {data}: database disk image is malformed",
              "mcap": "File end magic is invalid"}[suffix]
    assert err == f"unet-bag label: error: cannot open the bag {src}: ReaderError: {reason}; is it a complete " \
                  "rosbag2 folder (metadata.yaml plus its .db3 or .mcap files)?\n"


def test_corrupt_bag_file(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _camera_bag(tmp_path / "in")
    data = bytearray((src / "in.db3").read_bytes())
    data[4096:12288] = b"\xab" * 8192
    (src / "in.db3").write_bytes(bytes(data))
    assert "malformed" in _label(tmp_path, src, tiny_model, capsys)


def test_garbage_metadata(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _camera_bag(tmp_path / "in")
    (src / "metadata.yaml").write_text("rosbag2_bagfile_information: [unclosed\n")
    assert "cannot open the bag" in _label(tmp_path, src, tiny_model, capsys)


def test_empty_bag(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _camera_bag(tmp_path / "in", n=0)
    assert "has no messages" in _label(tmp_path, src, tiny_model, capsys)
    assert main(["play", str(src)]) == 1
    assert "has no messages" in capsys.readouterr().err


def _bag_with_unknown_type(path: Path, with_definition: bool) -> Path:
    store = typestore()
    with Writer(path, version=8) as w:
        cam = w.add_connection("/camera/image_raw", IMAGE, typestore=store)
        header = store.types["std_msgs/msg/Header"](stamp=bag.stamp_msg(store, START), frame_id="c")
        w.write(cam, START, store.serialize_cdr(
            bag.image_message(store, np.zeros((8, 8, 3), np.uint8), "rgb8", header), IMAGE))
        odd = w.add_connection("/odd", "acme_msgs/msg/Widget", msgdef="int32 x" if with_definition else " ",
                               rihs01="RIHS01_" + "0" * 64)
        w.write(odd, START + 1, b"\x00\x01\x00\x00\x07\x00\x00\x00")
    if not with_definition:  # as an older ROS 2 records it: no definition at all
        import sqlite3

        with sqlite3.connect(path / f"{path.name}.db3") as db:
            db.execute("UPDATE message_definitions SET encoded_message_definition = ''")
    return path


def test_unknown_type_without_definition(tmp_path: Path, tiny_model: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = _bag_with_unknown_type(tmp_path / "in", with_definition=False)
    err = _label(tmp_path, src, tiny_model, capsys)
    assert "unknown message type 'acme_msgs/msg/Widget'" in err
    advice = "--exclude-topics /odd"
    assert advice in err
    out = tmp_path / "out"  # the advice works: follow it
    assert main(["label", str(src), str(out), "--model", str(tiny_model), *advice.split()]) == 0
    with bag.open_bag(out) as reader:
        assert "/odd" not in {c.topic for c in reader.connections}
        assert "/camera/segmentation/labels" in {c.topic for c in reader.connections}


def test_unknown_type_with_definition_is_copied_but_not_played(tmp_path: Path, tiny_model: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = _bag_with_unknown_type(tmp_path / "in", with_definition=True)
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--backend", "onnxruntime"]) == 0
    with bag.open_bag(out) as reader:
        assert {c.topic: c.msgdef.data for c in reader.connections}["/odd"] == "int32 x"
    capsys.readouterr()
    assert main(["play", str(src)]) == 1
    err = capsys.readouterr().err
    assert "unknown message type 'acme_msgs/msg/Widget' on topic /odd" in err and "--topics" in err


def test_wrong_topics(tmp_path: Path, tiny_model: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    store = typestore()
    src = tmp_path / "in"
    with Writer(src, version=8) as w:
        conn = w.add_connection("/note", "std_msgs/msg/String", typestore=store)
        w.write(conn, START, store.serialize_cdr(store.types["std_msgs/msg/String"](data="x"), "std_msgs/msg/String"))
    out = tmp_path / "out"
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--topics", "/note"]) == 1
    assert "not sensor_msgs/msg/Image" in capsys.readouterr().err
    assert main(["label", str(src), str(out), "--model", str(tiny_model), "--topics", "/missing"]) == 1
    assert "are not in the bag" in capsys.readouterr().err
    _no_output(tmp_path, out)


def test_existing_output_is_left_alone(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _camera_bag(tmp_path / "in", n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["label", str(src), str(out), "--model", str(tiny_model)]) == 1
    assert "exists already" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _camera_bag(tmp_path / "in", n=2)
    assert main(["label", str(src), str(tmp_path / "out"), "--model", str(tmp_path / "none.onnx")]) == 1
    assert "no model at" in capsys.readouterr().err


def test_failure_midway_leaves_no_output(tmp_path: Path, tiny_model: Path) -> None:
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter

    class FailingSegmenter(Segmenter):
        calls = 0

        def run(self, frames):  # type: ignore[no-untyped-def]
            FailingSegmenter.calls += 1
            if FailingSegmenter.calls == 3:
                raise RuntimeError("backend fell over")
            return super().run(frames)

    src = _camera_bag(tmp_path / "in")
    out = tmp_path / "out"
    with (create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=4)) as backend,
          pytest.raises(RuntimeError, match="fell over")):
        label_bag(src, out, FailingSegmenter(backend, backend.info.classes), batch=4, progress=False)
    _no_output(tmp_path, out)


def test_from_images_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["from-images", str(tmp_path / "none"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["from-images", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    assert main(["from-images", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "cannot read" in capsys.readouterr().err
    _no_output(tmp_path, tmp_path / "out")
    with pytest.raises(BagError, match="--rate must be > 0"):
        bag.bag_from_images([], tmp_path / "out", rate=0)
    for rate in ("nan", "inf"):
        assert main(["from-images", str(tmp_path / "empty"), str(tmp_path / "out"), "--rate", rate]) == 1
        assert "--rate must be > 0 Hz and finite" in capsys.readouterr().err
    # --limit 0 wrote every image and --limit -1 all but the last, each saying "wrote"
    (tmp_path / "empty" / "broken.png").unlink()
    for i in range(2):
        cv2.imwrite(str(tmp_path / "empty" / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    for limit in ("0", "-1"):
        assert main(["from-images", str(tmp_path / "empty"), str(tmp_path / "out"), "--limit", limit]) == 1
        assert "--limit must be >= 1" in capsys.readouterr().err


def test_model_emitting_ids_outside_its_table_is_one_error(tmp_path: Path, tiny_model: Path) -> None:
    """A model that lies about its classes stops the run with a BagError (one line from main), no traceback."""
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter

    src = _camera_bag(tmp_path / "in", n=2)
    out = tmp_path / "out"
    with create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=4)) as backend:
        real_infer = backend._infer  # the model's own output, under submit() since backends submit and collect

        def lying_infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            labels, confidence = real_infer(batch)
            return np.full_like(labels, 200), confidence

        backend._infer = lying_infer  # type: ignore[method-assign]
        with pytest.raises(BagError, match="class id 200"):
            label_bag(src, out, Segmenter(backend, backend.info.classes), progress=False)
    _no_output(tmp_path, out)
