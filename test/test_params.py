"""Parameter validation: a bad value stops start-up with one message naming it; descriptors are real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from rcl_interfaces.msg import ParameterType
from rclpy.parameter import Parameter

from ros_graph import RosGraph, wait_until
from unet_perception.launch_support import node_command, node_env
from unet_perception.node_params import PARAMS, StartupError

TIMEOUT_S = 60


def run_node(tmp_path: Path, params: dict) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """The real CLI with a params file (rcl drops a -p value whose type differs from the file's, so the
    file here sets only what no case overrides)."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text("/**:\n  ros__parameters:\n    image_topics: [cli/image_raw]\n")
    return subprocess.run(node_command(params_file, params), env=os.environ | node_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)


@pytest.fixture(scope="module")
def corrupt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "corrupt.onnx"
    path.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    return path


# through the real CLI: exit status 1 and exactly one FATAL line naming the parameter or path
CLI_CASES = {
    "bad backend": ({"backend": "tpu"}, ["parameter 'backend' is 'tpu'", "onnxruntime"]),
    "max_batch not a number": ({"max_batch": "many"}, ["parameter 'max_batch'", "'many'"]),
    "missing model": ({"model_path": "/nonexistent/model.onnx"}, ["model_path", "'/nonexistent/model.onnx'",
                                                                  "does not exist"]),
    "tensorrt on the cpu": ({"backend": "tensorrt"}, ["backend 'tensorrt'", "runs on CUDA only", "device"]),
    "corrupt model": (None, ["model_path", "corrupt.onnx", "not a readable ONNX model"]),
    "two cameras on one output": ({"image_topics": ["/cam/left", "/cam/right"]},
                                  ["image_topics", "'/cam/left' and '/cam/right'", "/cam/segmentation/*"]),
}
# in-process (faster): the same StartupError that main() turns into that FATAL line
IN_PROCESS_CASES = {
    "max_batch -1": ({"max_batch": -1}, "parameter 'max_batch' rejected: .*out of range"),
    "max_batch 65": ({"max_batch": 65}, "parameter 'max_batch' rejected: .*out of range"),
    "bad input qos": ({"input_qos": "sometimes"}, "parameter 'input_qos' is 'sometimes'.*best_effort"),
    "bad output qos": ({"output_qos": "latched"}, "parameter 'output_qos' is 'latched'.*reliable"),
    "unknown_threshold out of range": ({"unknown_threshold": 256}, "parameter 'unknown_threshold' rejected: "
                                       ".*out of range"),
    "alpha out of range": ({"overlay_alpha": 1.5}, "parameter 'overlay_alpha' rejected: .*out of range"),
    "bad class colour": ({"class_colors": ["Road=300,0,0"]}, "class_colors entry 'Road=300,0,0'"),
    "unknown class colour": ({"class_colors": ["Lava=1,2,3"]}, "class_colors: .*Lava"),
    "empty topic list": ({"image_topics": ["/"]}, "parameter 'image_topics'"),
    "invalid topic name": ({"image_topics": ["cam 1/image_raw"]}, "parameter 'image_topics'.*cam 1"),
    "workers 65": ({"workers": 65}, "parameter 'workers' rejected: .*out of range"),
    "spin_us negative": ({"spin_us": -1}, "parameter 'spin_us' rejected: .*out of range"),
    "spin_us a word": ({"spin_us": "long"}, "parameter 'spin_us'.*'long'"),
    "workers on cuda": ({"workers": 2, "device": "cuda"}, "parameter 'workers' is 2 with device 'cuda'.*set "
                        "workers to 0 or 1"),
    "workers with batches": ({"workers": 2, "max_batch": 4}, "parameter 'workers' is 2 with max_batch 4; choose "
                             "one way"),
    "workers with overlap": ({"workers": 2, "overlap": "always"}, "parameter 'workers' is 2 with overlap "
                             "'always'.*overlap to never or auto"),
    "no outputs": ({"publish_labels": False, "publish_confidence": False, "publish_color": False,
                    "publish_overlay": False}, "switch at least one output on"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_invalid_start_up_exits_with_one_clear_message(case: str, tiny_model: Path, corrupt_model: Path,
                                                       tmp_path: Path) -> None:
    params, needles = CLI_CASES[case]
    params = {"model_path": str(tiny_model), **(params if params is not None else
                                                 {"model_path": str(corrupt_model)})}
    result = run_node(tmp_path, params)
    assert result.returncode == 1, result.stderr
    fatal = [line for line in result.stderr.splitlines() if "[FATAL]" in line]
    assert len(fatal) == 1, result.stderr
    for needle in needles:
        assert needle in fatal[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", list(IN_PROCESS_CASES))
def test_invalid_parameter_stops_start_up(case: str, tiny_model: Path) -> None:
    params, pattern = IN_PROCESS_CASES[case]
    with RosGraph() as graph, pytest.raises(StartupError, match=pattern):
        graph.segmentation_node(**{"model_path": str(tiny_model), **params})


def test_descriptors_ranges_and_read_only(tiny_model: Path) -> None:
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/p/image_raw"])
        for spec in PARAMS:
            d = node.describe_parameter(spec.name)
            assert d.description, spec.name
            assert d.read_only == (spec.name != "overlay_alpha"), spec.name
        assert node.describe_parameter("max_batch").integer_range[0].from_value == 0  # 0 = auto
        assert node._segmenter.backend.max_batch == 1  # auto on device cpu: one frame per batch
        assert node.describe_parameter("class_colors").type == ParameterType.PARAMETER_STRING_ARRAY
        assert "best_effort" in node.describe_parameter("input_qos").additional_constraints
        assert node.get_parameter("output_qos").value == "reliable"  # rviz2 and best-effort tools both hear it
        assert node.describe_parameter("unknown_threshold").integer_range[0].to_value == 255
        # overlay_alpha changes at run time within its range; read-only ones and bad values are refused
        assert node.set_parameters([Parameter("overlay_alpha", value=0.8)])[0].successful
        assert node._alpha == 0.8
        assert not node.set_parameters([Parameter("overlay_alpha", value=2.0)])[0].successful
        assert not node.set_parameters([Parameter("max_batch", value=2)])[0].successful
        assert node._alpha == 0.8


@pytest.fixture(scope="module")
def model_without_confidence(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its confidence output removed: what models exported before it existed look like."""
    import onnx

    model = onnx.load(str(tiny_model))
    kept = [o for o in model.graph.output if o.name != "confidence"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    path = tmp_path_factory.mktemp("old") / "no_confidence.onnx"
    onnx.save(model, str(path))
    return path


def test_unknown_threshold_needs_a_confidence_output(model_without_confidence: Path) -> None:
    with RosGraph() as graph, pytest.raises(StartupError, match="unknown_threshold is 100 but model .* has no "
                                                                "confidence output"):
        graph.segmentation_node(model_path=str(model_without_confidence), unknown_threshold=100)


def test_a_model_without_confidence_still_runs_without_that_topic(model_without_confidence: Path) -> None:
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(model_without_confidence), image_topics=["/old/image_raw"])
        assert set(node._cameras[0].publishers) == {"labels", "color", "overlay"}
        assert graph.node.count_publishers("/old/segmentation/confidence") == 0


def test_docs_list_every_parameter_with_its_default() -> None:
    """docs/node.md's table names each declared parameter, default and changeability (nothing stale)."""
    import json

    from conftest import REPO

    rows = {}
    for line in (REPO / "docs" / "node.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`") and cells[2] in ("yes", "no"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    for spec in PARAMS:
        default = "[]" if spec.default is Parameter.Type.STRING_ARRAY else json.dumps(spec.default)
        assert rows.get(spec.name) == (default, "no" if spec.read_only else "yes"), spec.name
    assert set(rows) == {spec.name for spec in PARAMS}


def test_auto_workers_one_per_camera_up_to_the_cores_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """workers 0: one per camera up to the usable cores on the cpu with stages in turn, else 1; threads 0 shares
    the cores among them (one worker keeps the library's default)."""
    from unet_perception import node

    defaults = {spec.name: spec.default for spec in PARAMS}
    monkeypatch.setattr(node, "usable_cores", lambda: 2)
    assert [node.worker_count(defaults, cams) for cams in (1, 2, 4)] == [1, 2, 2]
    assert node.worker_count(defaults | {"device": "cuda"}, 4) == 1
    assert node.worker_count(defaults | {"overlap": "always"}, 4) == 1
    assert node.worker_count(defaults | {"max_batch": 4}, 4) == 1
    assert node.worker_count(defaults | {"max_batch": 1}, 4) == 2
    assert node.worker_count(defaults | {"workers": 3}, 4) == 3
    assert node.worker_count(defaults | {"workers": 3}, 1) == 3  # more than the cameras: a camera's frames overlap
    assert [node.inference_threads(defaults, w) for w in (1, 2)] == [0, 1]
    assert node.inference_threads(defaults | {"threads": 3}, 2) == 3
    monkeypatch.setattr(node, "usable_cores", lambda: 8)
    assert node.worker_count(defaults, 4) == 4 and node.inference_threads(defaults, 4) == 2
    assert node.inference_threads(defaults, 3) == 2  # 8 // 3: no core given twice


def test_a_node_whose_autostart_fails_leaves_the_graph(tiny_model: Path) -> None:
    """The caller never gets the half-built node to destroy, so it destroys itself: its name, services and
    publishers are gone from the graph before the StartupError reaches the caller."""
    with RosGraph() as graph:
        graph.segmentation_node(namespace="/alive", model_path=str(tiny_model), image_topics=["/alive/image_raw"])
        wait_until(lambda: ("segmentation_node", "/alive") in graph.node.get_node_names_and_namespaces(),
                   what="the control node in the graph")  # the graph query sees nodes of this process
        with pytest.raises(StartupError, match="input_qos") as raised:  # its traceback keeps the node object alive
            graph.segmentation_node(namespace="/doomed", model_path=str(tiny_model), input_qos="sometimes")
        wait_until(lambda: ("segmentation_node", "/doomed") not in graph.node.get_node_names_and_namespaces(),
                   what="the failed node to leave the graph")
        # rclpy's own ~/get_type_description outlives any destroyed node in the graph (a plain rclpy Node's too)
        wait_until(lambda: not [name for name, _ in graph.node.get_service_names_and_types() if name.startswith(
            "/doomed/") and not name.endswith("/get_type_description")], what="the failed node's services to go")
        assert raised.traceback  # held until here


def test_a_second_ctrl_c_does_not_cut_the_clean_up_of_a_failed_autostart_short(tiny_model: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt (what Python raises for SIGINT) in the middle of that clean-up: it goes on to the end
    (the node leaves the graph) and the caller still learns why start-up failed."""
    from unet_perception.node import SegmentationNode

    deactivate, interrupted = SegmentationNode._deactivate, []

    def interrupted_once(node: SegmentationNode) -> None:
        if not interrupted:  # the signal lands on destroy_node's first step, before anything is destroyed
            interrupted.append(True)
            raise KeyboardInterrupt
        deactivate(node)

    monkeypatch.setattr(SegmentationNode, "_deactivate", interrupted_once)
    with RosGraph() as graph:
        with pytest.raises(StartupError, match="input_qos") as raised:  # its traceback keeps the node object alive
            graph.segmentation_node(namespace="/doomed2", model_path=str(tiny_model), input_qos="sometimes")
        assert interrupted
        wait_until(lambda: ("segmentation_node", "/doomed2") not in graph.node.get_node_names_and_namespaces(),
                   what="the failed node to leave the graph")
        assert raised.traceback  # held until here: the node left because it was destroyed, not collected
