"""package.xml names only dependencies rosdep can resolve on ROS 2 Jazzy (`rosdep install --from-paths src`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from conftest import REPO

# Checked by hand against ros/rosdistro (rosdep/base.yaml, rosdep/python.yaml, jazzy/distribution.yaml).
# python3-onnx-pip is *not* a key there: rosdep stopped on it.
SYSTEM_KEYS = {"python3-numpy", "python3-opencv", "python3-yaml", "python3-tqdm", "python3-pytest",
               "python3-onnxruntime-pip", "python3-rosbags-pip", "python3-simplejpeg-pip"}
ROS_PACKAGES = {"rclpy", "lifecycle_msgs", "sensor_msgs", "std_msgs", "diagnostic_msgs", "vision_msgs",
                "nav_msgs", "geometry_msgs", "tf2_ros",
                "cv_bridge", "launch", "launch_ros", "launch_testing_ros", "rmw_fastrtps_cpp"}
DEPENDS = ("depend", "exec_depend", "build_depend", "test_depend", "buildtool_depend")


def test_every_dependency_is_a_rosdep_key_or_a_jazzy_package() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    names = {e.text for tag in DEPENDS for e in root.iter(tag)}
    assert names <= SYSTEM_KEYS | ROS_PACKAGES, sorted(names - SYSTEM_KEYS - ROS_PACKAGES)
    assert "vision_msgs" in names and "python3-onnx-pip" not in names


def test_vision_msgs_stand_in_stays_out_of_ros_workspaces() -> None:
    """interfaces/vision_msgs is for the wheel venv only; a workspace build must use the official package."""
    folder = REPO / "interfaces" / "vision_msgs"
    assert (folder / "COLCON_IGNORE").is_file()
    assert ET.parse(folder / "package.xml").getroot().findtext("name") == "vision_msgs"
