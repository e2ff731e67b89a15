"""launch_support (always) and launch/seg.launch.py (where launch_ros imports)."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from unet_perception import launch_support as ls
from unet_perception.node_params import PARAMS

FASTDDS_NS = "{http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles}"


def test_files_resolve_to_the_checkout_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    assert ls.share_dir() == REPO
    assert ls.fastdds_profile_path() == REPO / "config" / "fastdds_large_frames.xml"
    assert ls.default_params_file() == REPO / "config" / "seg.yaml"
    assert ls.rviz_config_path().is_file()
    assert ls.default_model_path() == REPO / "models" / "unet_camvid.onnx"


def test_files_resolve_to_the_ament_share_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (tmp_path / "share" / "ament_index" / "resource_index" / "packages" / ls.PACKAGE).touch()
    (tmp_path / "share" / ls.PACKAGE).mkdir()
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    assert ls.default_model_path() == tmp_path / "share" / ls.PACKAGE / "models" / "unet_camvid.onnx"


def test_pip_install_finds_the_share_under_sys_prefix_never_site_packages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install .` (not editable): data_files land in <sys.prefix>/share/unet_perception."""
    monkeypatch.delenv("AMENT_PREFIX_PATH", raising=False)
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / ls.PACKAGE).mkdir(parents=True)
    monkeypatch.setattr(ls, "__file__", str(site / ls.PACKAGE / "launch_support.py"))
    monkeypatch.setattr(ls.sys, "prefix", str(tmp_path))
    share = tmp_path / "share" / ls.PACKAGE
    assert ls.share_dir() == share  # not there yet: errors name the right folder, never site-packages
    (share / "config").mkdir(parents=True)
    (share / "package.xml").touch()
    assert ls.default_params_file() == share / "config" / "seg.yaml"
    assert ls.default_model_path() == share / "models" / "unet_camvid.onnx"


def test_a_missing_fastdds_profile_is_reported_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "fastdds_large_frames.xml"
    monkeypatch.setattr(ls, "fastdds_profile_path", lambda: missing)
    assert ls.node_env({}) == {}
    env: dict[str, str] = {}
    assert ls.apply_node_env(env) == "" and ls.PROFILE_ENV not in env
    assert ls.node_env({ls.PROFILE_ENV: "/site/dds.xml"}) == {ls.PROFILE_ENV: "/site/dds.xml"}
    assert str(missing) in ls.missing_profile_note() and "does not exist" in ls.missing_profile_note()
    assert ls.node_action_kwargs(environ={})["additional_env"] == {}


def test_fastdds_profile_gives_writers_a_16mib_shm_segment() -> None:
    root = ET.parse(ls.fastdds_profile_path()).getroot()
    transports = {t.findtext(f"{FASTDDS_NS}transport_id"): t for t in root.iter(f"{FASTDDS_NS}transport_descriptor")}
    shm = [t for t in transports.values() if t.findtext(f"{FASTDDS_NS}type") == "SHM"]
    assert len(shm) == 1 and int(shm[0].findtext(f"{FASTDDS_NS}segment_size")) == 16 * 1024 * 1024
    participant = root.find(f"{FASTDDS_NS}participant")
    assert participant.get("is_default_profile") == "true"
    rtps = participant.find(f"{FASTDDS_NS}rtps")
    assert rtps.findtext(f"{FASTDDS_NS}useBuiltinTransports") == "false"
    used = [e.text for e in rtps.iter(f"{FASTDDS_NS}transport_id")]
    assert sorted(used) == sorted(transports)  # SHM and UDPv4, both declared


def test_params_file_names_only_declared_parameters() -> None:
    def flat(tree: dict, prefix: str = "") -> dict:  # type: ignore[type-arg]
        """rcl's reading of nested YAML: ``ground: {enabled: ...}`` is the parameter ``ground.enabled``."""
        out: dict = {}  # type: ignore[type-arg]
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    params = flat(yaml.safe_load(ls.default_params_file().read_text())["/**"]["ros__parameters"])
    declared = {spec.name: spec for spec in PARAMS}
    assert set(params) <= set(declared)
    for name, value in params.items():
        default = declared[name].default
        assert type(value) is type(default), f"{name}: {value!r} in seg.yaml vs default {default!r}"


def test_rviz_config_shows_input_colour_overlay_points_and_grid() -> None:
    displays = yaml.safe_load(ls.rviz_config_path().read_text())["Visualization Manager"]["Displays"]
    assert [(d["Class"], d["Topic"]["Value"]) for d in displays] == [
        ("rviz_default_plugins/Image", "image_raw"), ("rviz_default_plugins/Image", "segmentation/color"),
        ("rviz_default_plugins/Image", "segmentation/overlay"),
        ("rviz_default_plugins/PointCloud2", "segmentation/points"),
        ("rviz_default_plugins/Map", "segmentation/ground_grid")]


def test_node_env_keeps_a_users_profile() -> None:
    assert ls.node_env({}) == {ls.PROFILE_ENV: str(ls.fastdds_profile_path())}
    assert ls.node_env({ls.PROFILE_ENV: "/site/dds.xml"}) == {ls.PROFILE_ENV: "/site/dds.xml"}
    env: dict[str, str] = {}
    assert ls.apply_node_env(env) == str(ls.fastdds_profile_path()) == env[ls.PROFILE_ENV]


def test_node_action_kwargs_from_launch_arguments() -> None:
    kw = ls.node_action_kwargs(model="/m.onnx", image_topics="[front/image_raw, rear/image_raw/compressed]",
                               namespace="car", use_sim_time="true", respawn="True", respawn_delay="0.5",
                               log_level="DEBUG", environ={})
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == \
        ("unet_perception", "segmentation_node", "segmentation_node", "car")
    assert kw["parameters"] == [str(ls.default_params_file()),
                                {"use_sim_time": True, "model_path": "/m.onnx",
                                 "image_topics": ["front/image_raw", "rear/image_raw/compressed"]}]
    assert kw["additional_env"] == {ls.PROFILE_ENV: str(ls.fastdds_profile_path())}
    assert kw["respawn"] is True and kw["respawn_delay"] == 0.5
    assert kw["arguments"] == ["--ros-args", "--log-level", "segmentation_node:=debug"]
    # empty arguments keep the params file's values
    assert ls.node_action_kwargs(environ={})["parameters"][1] == {"use_sim_time": False}
    assert ls.node_action_kwargs(autostart="false", environ={})["parameters"][1] == {"use_sim_time": False,
                                                                                     "autostart": False}


@pytest.mark.parametrize("kwargs, message", [
    ({"log_level": "loud"}, "log_level must be one of"),
    ({"respawn": "maybe"}, "respawn must be true or false, got 'maybe'"),
    ({"autostart": "later"}, "autostart must be true or false, got 'later'"),
    ({"params_file": "/nope.yaml"}, "params_file '/nope.yaml' does not exist"),
    ({"image_topics": "[ , ]"}, "names no topic"),
])
def test_node_action_kwargs_errors(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        ls.node_action_kwargs(**kwargs)


def test_node_command_is_the_cli_with_params_file_then_overrides() -> None:
    cmd = ls.node_command("/p.yaml", {"image_topics": ["a/image_raw", "b"], "max_batch": 2,
                                      "publish_color": False}, namespace="car", python="py")
    assert cmd == ["py", "-m", "unet_perception.node", "--ros-args", "--params-file", "/p.yaml",
                   "-p", "image_topics:=['a/image_raw', 'b']", "-p", "max_batch:=2", "-p", "publish_color:=false",
                   "-r", "__ns:=car"]


def load_launch_file():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("seg_launch", REPO / "launch" / "seg.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.launch_ros
def test_launch_file_declares_arguments_and_builds_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("launch_ros", reason="launch_ros is not installed (no ROS 2 install; PyPI has no wheel)")
    from launch import LaunchContext
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.utilities import perform_substitutions

    monkeypatch.delenv(ls.PROFILE_ENV, raising=False)  # no profile of the user's: the shipped one must be given

    description = load_launch_file().generate_launch_description()
    declared = {e.name: e.default_value for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert {"model", "backend", "image_topics", "namespace", "params_file", "use_sim_time", "autostart", "respawn",
            "respawn_delay", "log_level", "rviz"} <= set(declared)
    context = LaunchContext()
    for name in declared:
        context.launch_configurations[name] = {"image_topics": "[front/image_raw]"}.get(name, "")
    context.launch_configurations.update(use_sim_time="false", respawn="false", respawn_delay="2.0",
                                         log_level="info", params_file=str(ls.default_params_file()))
    opaque = next(e for e in description.entities if isinstance(e, OpaqueFunction))
    (node,) = opaque.execute(context)
    assert node.node_executable == "segmentation_node"
    # ExecuteProcess keeps additional_env as (key, value) substitution lists; the process must get the large-frames
    # Fast DDS profile (without it 640x480 frames mostly never arrive between processes)
    env = {perform_substitutions(context, k): perform_substitutions(context, v) for k, v in node.additional_env}
    assert env == {ls.PROFILE_ENV: str(ls.fastdds_profile_path())} and ls.fastdds_profile_path().is_file()


def test_docs_name_every_launch_argument() -> None:
    """docs/node.md's "Launch file" section lists each argument seg.launch.py declares (read without launch_ros)."""
    import ast

    tree = ast.parse((REPO / "launch" / "seg.launch.py").read_text())
    arguments = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "ARGUMENTS" for t in node.targets))
    assert isinstance(arguments, ast.Dict)
    names = [ast.literal_eval(key) for key in arguments.keys if key is not None]
    section = (REPO / "docs" / "node.md").read_text().split("## Launch file", 1)[1].split("\n## ", 1)[0]
    assert names and [n for n in names if f"`{n}`" not in section] == []
