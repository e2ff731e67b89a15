"""The node's ground outputs for one camera: its ``camera_info`` subscription, the ``points`` and ``ground_grid``
publishers, and the projection cached per (CameraInfo, pose). The geometry is ``ground``/``camera_model``'s, the
messages ``ground_msgs``'; the node calls :meth:`GroundCamera.publish` after the labels (docs/node.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from nav_msgs.msg import OccupancyGrid
from sensor_msgs.msg import CameraInfo, PointCloud2
from std_msgs.msg import Header

from unet_perception.camera_model import CameraInfoError, CameraModel, camera_rays, check_size
from unet_perception.ground import GridSpec, GroundError, GroundPose, GroundProjection, TfGround, class_kinds
from unet_perception.ground_msgs import SerializedCloud, cloud_data, occupancy_grid
from unet_perception.node_params import StartupError
from unet_perception.topics import GROUND_GRID, POINTS, camera_info_topic

SOURCES = ("auto", "tf", "parameters")


def tf2_available() -> bool:
    return importlib.util.find_spec("tf2_ros") is not None


@dataclass(frozen=True)
class GroundSettings:
    """The ``ground.*`` parameters, checked, with the model's class table turned into the free/obstacle lookup."""

    source: str                 # "tf" or "parameters" (auto resolved)
    base_frame: str
    pose: GroundPose | None     # source parameters
    stride: int
    max_range: float
    grid: GridSpec
    kinds: np.ndarray
    max_pixels: int

    @classmethod
    def from_params(cls, p: dict[str, Any], class_names: list[str]) -> GroundSettings:
        """StartupError naming the parameter for a value the projection cannot use."""
        source = p["ground.source"]
        if source == "auto":
            source = "tf" if tf2_available() else "parameters"
        elif source == "tf" and not tf2_available():
            raise StartupError("ground.source is 'tf' but tf2_ros does not import (a ROS install has it: "
                               "ros-jazzy-tf2-ros); set ground.source to 'parameters' and give ground.camera_height, "
                               "ground.camera_pitch, ground.camera_roll")
        if not p["ground.base_frame"].strip():
            raise StartupError("ground.base_frame is empty; give the frame the grid is published in (base_link)")
        if not p["ground.max_range"] > 0:
            raise StartupError(f"ground.max_range is {p['ground.max_range']}; it must be > 0 (metres)")
        origin = list(p["ground.grid_origin"])
        if len(origin) != 2:
            raise StartupError(f"ground.grid_origin is {origin}; give [x, y] in metres")
        try:
            pose = (GroundPose.from_angles(p["ground.camera_height"], p["ground.camera_pitch"],
                                           p["ground.camera_roll"]) if source == "parameters" else None)
            grid = GridSpec(p["ground.grid_resolution"], p["ground.grid_width"], p["ground.grid_height"],
                            float(origin[0]), float(origin[1]))
            kinds = class_kinds(class_names, p["ground.free_classes"], p["ground.obstacle_classes"])
        except ValueError as exc:  # GroundError is a ValueError
            raise StartupError(str(exc)) from exc
        return cls(source, p["ground.base_frame"], pose, p["ground.stride"], p["ground.max_range"], grid, kinds,
                   p["max_image_pixels"])


class TfSource:
    """``ground.source: tf``: a tf2_ros Buffer and TransformListener on ``node`` (tf2_ros is imported here: only
    ROS installs have it; this path has not run against a real tf2_ros in this project's tests, which use
    ``ground.TfGround`` with a stand-in buffer)."""

    def __init__(self, node: Any, base_frame: str) -> None:
        import tf2_ros
        from rclpy.time import Time

        self.buffer = tf2_ros.Buffer()
        self.listener = tf2_ros.TransformListener(self.buffer, node)
        self.ground = TfGround(self.buffer, base_frame, Time())  # Time() = the latest transform

    def close(self) -> None:
        self.listener.unregister()


class GroundCamera:
    """One camera's ground projection outputs. ``record_error(message)`` counts a problem on the camera.

    The camera_info callback only checks and stores the CameraInfo; rays and projection are computed in the
    worker, when a frame comes and someone subscribes, so unsubscribed outputs and a driver's repeated
    CameraInfo cost nothing, and an expensive undistortion never holds up the executor's other callbacks.
    """

    def __init__(self, node: Any, image_topic: str, prefix: str, settings: GroundSettings, qos_in: Any,
                 qos_out: Any, tf: TfGround | None, record_error: Callable[[str], None]) -> None:
        self._node, self._settings, self._tf, self._record_error = node, settings, tf, record_error
        self._model: CameraModel | None = None  # the latest good CameraInfo (set by the callback)
        # the worker's cache: rays per CameraInfo, projection and cloud bytes per (CameraInfo, pose)
        self._rays_for: CameraModel | None = None
        self._rays: np.ndarray | None = None
        self._projection: GroundProjection | None = None
        self._pose_key = b""
        self._cloud: SerializedCloud | None = None
        self.ray_builds = 0         # how often rays were computed (once per CameraInfo in use)
        self.projection_builds = 0  # how often the projection was computed (once per CameraInfo and pose)
        self.points_pub = node.create_publisher(PointCloud2, f"{prefix}/{POINTS}", qos_out)
        self.grid_pub = node.create_publisher(OccupancyGrid, f"{prefix}/{GROUND_GRID}", qos_out)
        self.info_sub = node.create_subscription(CameraInfo, camera_info_topic(image_topic), self._on_camera_info,
                                                 qos_in)
        self.info_topic = self.info_sub.topic_name

    @property
    def waiting(self) -> bool:
        """No usable CameraInfo yet: the camera's status is a WARN, labels are still published."""
        return self._model is None

    def _on_camera_info(self, msg: CameraInfo) -> None:
        """Check and keep it (a bad one is counted and the previous good one stays in use)."""
        try:
            model = CameraModel.from_camera_info(msg, self._settings.max_pixels)
        except (CameraInfoError, ValueError, TypeError) as exc:
            self._record_error(f"bad camera_info on {self.info_topic}: {exc}")
            return
        if model != self._model:
            self._model = model  # one reference swap: the worker reads whichever is current

    def publish(self, header: Header, labels: np.ndarray) -> None:
        """Points and grid of one frame, each only when subscribed (worker thread); CameraInfoError/GroundError
        for a frame that does not match its CameraInfo or a ground that cannot be placed (nothing published)."""
        want_points = self.points_pub.get_subscription_count() > 0
        want_grid = self.grid_pub.get_subscription_count() > 0
        model = self._model
        if not (want_points or want_grid) or model is None:
            return
        check_size(model, (labels.shape[1], labels.shape[0]))
        s = self._settings
        pose = s.pose if self._tf is None else self._tf.pose(header.frame_id)
        assert pose is not None
        if model != self._rays_for:
            self._rays, self._rays_for, self._projection = camera_rays(model, s.stride), model, None
            self.ray_builds += 1
        if self._projection is None or pose.key() != self._pose_key:
            self._projection = GroundProjection(model, s.stride, pose, s.max_range, s.grid, self._rays)
            self._pose_key, self._cloud = pose.key(), None
            self.projection_builds += 1
        projection = self._projection
        if want_points:
            if self._cloud is None or self._cloud.frame_id != header.frame_id:
                rows, cols = projection.points.shape[:2]
                self._cloud = SerializedCloud(cloud_data(projection.points), rows, cols, header.frame_id)
            self.points_pub.publish(self._cloud.stamped(header.stamp.sec, header.stamp.nanosec))
        if want_grid:
            grid_header = Header(stamp=header.stamp, frame_id=s.base_frame)
            self.grid_pub.publish(occupancy_grid(projection.grid(labels, s.kinds), s.grid, grid_header))

    def destroy(self) -> None:
        self._node.destroy_subscription(self.info_sub)
        self._node.destroy_publisher(self.points_pub)
        self._node.destroy_publisher(self.grid_pub)


__all__ = ["SOURCES", "GroundCamera", "GroundError", "GroundSettings", "TfSource"]
