"""Hostile model files: every malformed metadata field is one ModelError naming the file and the field, in the
node, `unet-bag label`, `label-many`, `unet-build-engine` and `unet-evaluate`; a model_path that is a folder,
a device or a FIFO is named as such (and opening a FIFO does not block).

The files are real ONNX models (the tiny test model) whose metadata props are edited with the onnx package.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from unet_perception.model_contract import ModelError, read_model_info

GOOD_CLASS = {"id": 0, "name": "Sky", "color": [128, 128, 128]}


def classes(*rows: Any) -> str:
    return json.dumps(list(rows))


DEEP = "[" * 100_000 + "]" * 100_000
# (metadata changes, the field the error must name); a None value removes the key.
CASES: dict[str, tuple[dict[str, str | None], str]] = {
    "classes is a number": ({"classes": "5"}, "classes"),
    "classes is a string": ({"classes": '"abc"'}, "classes"),
    "classes is an object": ({"classes": '{"id": 0}'}, "classes"),
    "classes is empty": ({"classes": "[]"}, "classes"),
    "classes is not JSON": ({"classes": "[{'id': 0}"}, "classes"),
    "classes nested deeply": ({"classes": DEEP}, "classes"),
    "classes missing": ({"classes": None}, "classes"),
    "too many classes": ({"classes": classes(*({"id": i, "name": f"c{i}", "color": [0, 0, 0]}
                                                for i in range(300)))}, "classes"),
    "a class is a number": ({"classes": classes(5)}, "classes[0]"),
    "color null": ({"classes": classes({**GOOD_CLASS, "color": None})}, "classes[0].color"),
    "color of two": ({"classes": classes({**GOOD_CLASS, "color": [1, 2]})}, "classes[0].color"),
    "color over 255": ({"classes": classes({**GOOD_CLASS, "color": [0, 0, 300]})}, "classes[0].color[2]"),
    "color a string": ({"classes": classes({**GOOD_CLASS, "color": ["a", 0, 0]})}, "classes[0].color[0]"),
    "color nested": ({"classes": classes({**GOOD_CLASS, "color": [[0], 0, 0]})}, "classes[0].color[0]"),
    "id a string": ({"classes": classes({**GOOD_CLASS, "id": "0"})}, "classes[0].id"),
    "id a boolean": ({"classes": classes({**GOOD_CLASS, "id": False})}, "classes[0].id"),
    "id missing": ({"classes": classes({"name": "Sky", "color": [0, 0, 0]})}, "classes[0].id"),
    "ids with a gap": ({"classes": classes(GOOD_CLASS, {**GOOD_CLASS, "id": 2})}, "classes"),
    "ids repeated": ({"classes": classes(GOOD_CLASS, GOOD_CLASS)}, "classes"),
    "name a number": ({"classes": classes({**GOOD_CLASS, "name": 5})}, "classes[0].name"),
    "name null": ({"classes": classes({**GOOD_CLASS, "name": None})}, "classes[0].name"),
    "name empty": ({"classes": classes({**GOOD_CLASS, "name": ""})}, "classes[0].name"),
    "name with NUL": ({"classes": classes(GOOD_CLASS, {"id": 1, "name": "Road\x00x", "color": [0, 0, 0]})},
                      "classes[1].name"),
    "name with an ANSI escape": ({"classes": classes({**GOOD_CLASS, "name": "\x1b[31mred"})}, "classes[0].name"),
    "name with a newline": ({"classes": classes({**GOOD_CLASS, "name": "a\nb"})}, "classes[0].name"),
    "name with a lone surrogate": ({"classes": '[{"id": 0, "name": "Sky\\ud800", "color": [0, 0, 0]}]'},
                                   "classes[0].name"),
    "name too long": ({"classes": classes({**GOOD_CLASS, "name": "x" * 10_000})}, "classes[0].name"),
    "ignore_index a word": ({"ignore_index": "abc"}, "ignore_index"),
    "ignore_index too big": ({"ignore_index": "999"}, "ignore_index"),
    "input_height a word": ({"input_height": "abc"}, "input_height"),
    "input_height zero": ({"input_height": "0"}, "input_height"),
    "input_height huge": ({"input_height": "9" * 5000}, "input_height"),
    "input_width a float": ({"input_width": "1e3"}, "input_width"),
    "input_width missing": ({"input_width": None}, "input_width"),
    "metrics a list": ({"metrics": "[1]"}, "metrics"),
    "metrics not JSON": ({"metrics": "{"}, "metrics"),
    "training nested deeply": ({"training": DEEP}, "training"),
    "dataset with an ANSI escape": ({"dataset": "\x1b]0;owned\x07camvid"}, "dataset"),
}


def edited(model: Path, out: Path, changes: dict[str, str | None]) -> Path:
    """A copy of ``model`` with its metadata props changed (None: removed), written with onnx."""
    import onnx

    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


@pytest.fixture(scope="module")
def bad_models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("bad_models")
    return {case: (edited(tiny_model, folder / f"bad{i}.onnx", changes), field)
            for i, (case, (changes, field)) in enumerate(CASES.items())}


def assert_names(message: str, path: Path, field: str) -> None:
    assert str(path) in message and f"'{field}'" in message, message
    assert message.isprintable(), f"raw control characters reach the log: {message!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_each_malformed_field_is_a_model_error_naming_file_and_field(bad_models: Any, case: str) -> None:
    path, field = bad_models[case]
    with pytest.raises(ModelError) as caught:
        read_model_info(path)
    assert_names(str(caught.value), path, field)


def test_the_unedited_copy_loads(tiny_model: Path, tmp_path: Path) -> None:
    """The editing itself breaks nothing: a copy with no change loads, with the same table."""
    copy = read_model_info(edited(tiny_model, tmp_path / "same.onnx", {}))
    assert copy.classes == read_model_info(tiny_model).classes


CLI_CASES = ["classes is a number", "classes is a string", "color null", "classes nested deeply",
             "name with a lone surrogate", "name with NUL", "input_height a word"]


def test_the_node_names_file_and_field(bad_models: Any) -> None:
    from ros_graph import RosGraph
    from unet_perception.node_params import StartupError

    for case in CLI_CASES:
        path, field = bad_models[case]
        with RosGraph() as graph, pytest.raises(StartupError) as caught:
            graph.segmentation_node(model_path=str(path), image_topics=["/meta/image_raw"])
        assert_names(str(caught.value), path, field)


def test_the_node_process_says_one_fatal_line(bad_models: Any) -> None:
    """The report: `StartupError: TypeError: 'int' object is not iterable`, no file named."""
    from ros_graph import start_node_process

    path, field = bad_models["classes is a number"]
    proc = start_node_process({"model_path": str(path), "image_topics": ["/meta/image_raw"]})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    fatal = [line for line in out.splitlines() if "[FATAL]" in line]
    assert len(fatal) == 1 and "Traceback" not in out and "TypeError" not in out, out
    assert_names(fatal[0], path, field)


def run_cli(main: Any, argv: list[str], capsys: Any) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def test_the_tools_name_file_and_field(bad_models: Any, tmp_path: Path, capsys: Any) -> None:
    """unet-bag label, label-many, unet-build-engine, unet-evaluate, unet-quantize, unet-demo: one error line each."""
    from unet_perception.tools import bag_cli, build_engine, demo
    from unet_perception.tools.bag import bag_from_images
    from unet_perception.training import evaluate, quantize

    import cv2
    import numpy as np

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.full((24, 32, 3), 90, np.uint8))
    bag = tmp_path / "in_bag"
    bag_from_images([image], bag, progress=False)
    data = tmp_path / "data"  # never reached: the model is refused first
    for case in CLI_CASES:
        path, field = bad_models[case]
        runs = {
            "label": (bag_cli.main, ["label", str(bag), str(tmp_path / f"out_{case}"), "--model", str(path)]),
            "label-many": (bag_cli.main, ["label-many", str(bag), "--out", str(tmp_path / f"many_{case}"),
                                          "--model", str(path)]),
            "build-engine": (build_engine.main, [str(path), "--build-only"]),
            "evaluate": (evaluate.main, [str(path), "--data", str(data), "--out", str(tmp_path / "eval")]),
            "quantize": (quantize.main, [str(path), str(tmp_path / "int8.onnx"), "--data", str(data)]),
            "demo": (demo.main, ["--images", str(data), "--model", str(path), "--out", str(tmp_path / "demo")]),
        }
        for tool, (main, argv) in runs.items():
            code, err = run_cli(main, argv, capsys)
            assert code != 0, f"{tool} {case}"
            lines = err.strip().splitlines()
            assert len(lines) == 1, f"{tool} {case}: {err}"
            assert_names(lines[0], path, field)


@pytest.mark.parametrize("kind", ["folder", "device", "fifo"])
def test_a_model_path_that_is_not_a_file_gets_its_own_line(kind: str, tmp_path: Path, tiny_model: Path) -> None:
    if kind == "folder":
        path, words = tmp_path, "is a folder"
        (tmp_path / "inside.onnx").write_bytes(tiny_model.read_bytes())
    elif kind == "device":
        path, words = Path("/dev/zero"), "is a character device"
    else:
        path, words = tmp_path / "model.onnx", "is a FIFO"
        os.mkfifo(path)
    result: list[BaseException] = []

    def read() -> None:
        try:
            read_model_info(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=read, daemon=True)  # a FIFO without a writer would block a plain open
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), f"reading {path} blocked"
    assert isinstance(result[0], ModelError) and words in str(result[0]), result
    assert "does not exist" not in str(result[0])
    if kind == "folder":
        assert "inside.onnx" in str(result[0])


def test_the_node_and_tools_name_a_fifo_and_a_folder_without_blocking(tmp_path: Path, capsys: Any) -> None:
    """model_path:=<FIFO> or a folder: one line naming what it is, from the node and every tool; no hang."""
    from ros_graph import RosGraph
    from unet_perception.node_params import StartupError
    from unet_perception.tools import bag_cli, build_engine
    from unet_perception.training import evaluate

    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    for path, words in ((fifo, "is a FIFO"), (tmp_path, "is a folder")):
        runs = {
            "label": (bag_cli.main, ["label", str(tmp_path / "no_bag"), str(tmp_path / "out"), "--model", str(path)]),
            "label-many": (bag_cli.main, ["label-many", str(tmp_path / "no_bag"), "--out", str(tmp_path / "many"),
                                          "--model", str(path)]),
            "build-engine": (build_engine.main, [str(path), "--build-only"]),
            "evaluate": (evaluate.main, [str(path), "--data", str(tmp_path), "--out", str(tmp_path / "eval")]),
        }
        for tool, (main, argv) in runs.items():
            done: list[int] = []
            thread = threading.Thread(target=lambda m=main, a=argv, d=done: d.append(m(a)), daemon=True)
            thread.start()
            thread.join(timeout=30)
            assert done and done[0] != 0, f"{tool} on {path}: blocked or succeeded"
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and words in err[0] and str(path) in err[0], (tool, err)
        with RosGraph() as graph, pytest.raises(StartupError, match=words):
            graph.segmentation_node(model_path=str(path), image_topics=["/fifo/image_raw"])
