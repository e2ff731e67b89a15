"""Start unet_perception's segmentation_node (and optionally rviz2) from config/seg.yaml.

    ros2 launch unet_perception seg.launch.py
    ros2 launch unet_perception seg.launch.py image_topics:="[front/image_raw, rear/image_raw/compressed]"
    ros2 launch unet_perception seg.launch.py namespace:=camera model:=/path/model.onnx rviz:=true
    ros2 launch unet_perception seg.launch.py autostart:=false   # a lifecycle manager configures it

An empty argument keeps the params file's value. The node gets the package's Fast DDS large-frame
profile (FASTRTPS_DEFAULT_PROFILES_FILE) unless the environment already names one. How the node is
built lives in unet_perception.launch_support, shared with `make demo` and the tests.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from unet_perception.launch_support import default_params_file, node_action_kwargs, rviz_config_path

ARGUMENTS = {
    "model": ("", "ONNX model path; empty = params file / the package's models/unet_camvid.onnx"),
    "backend": ("", "auto | onnxruntime | tensorrt | torch; empty = params file"),
    "image_topics": ("", "camera topics, e.g. '[front/image_raw, rear/image_raw/compressed]'; "
                         "empty = params file"),
    "namespace": ("", "namespace of the node (relative topics resolve inside it)"),
    "params_file": (str(default_params_file()), "YAML file with the node's parameters"),
    "use_sim_time": ("false", "use /clock (true when replaying bags with --clock)"),
    "autostart": ("", "true: configure and activate at start; false: wait for a lifecycle manager; "
                      "empty = params file (true)"),
    "respawn": ("false", "restart the node when it exits"),
    "respawn_delay": ("2.0", "seconds before a respawn"),
    "log_level": ("info", "debug | info | warn | error | fatal"),
    "rviz": ("false", "open rviz2 with config/seg.rviz (input, colour mask, overlay; the ground points and grid "
                      "with ground.enabled)"),
}


def _node(context, *args, **kwargs):  # noqa: ARG001 - OpaqueFunction signature
    values = {name: LaunchConfiguration(name).perform(context) for name in ARGUMENTS if name != "rviz"}
    return [Node(**node_action_kwargs(**values))]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        *(DeclareLaunchArgument(name, default_value=default, description=description)
          for name, (default, description) in ARGUMENTS.items()),
        OpaqueFunction(function=_node),
        Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
             arguments=["-d", str(rviz_config_path())],
             namespace=LaunchConfiguration("namespace"),
             condition=IfCondition(LaunchConfiguration("rviz"))),
    ])
