"""Labels on the ground plane: where each pixel's ray meets flat ground, and a drivable-area grid.

Pure NumPy (no rclpy). Frames (docs/node.md draws them):

- optical frame (the image's ``frame_id``): x right, y down, z forward (REP 103's ``_optical`` convention);
- ground frame (``ground.base_frame``): x forward, y left, z up, the ground is its z = 0 plane.

A :class:`GroundPose` places the optical frame in the ground frame, from ``ground.camera_height``/``pitch``/
``roll`` (the camera is then above the ground frame's origin, looking along its x axis) or from a TF transform.
A :class:`GroundProjection` is computed once per (CameraInfo, pose): the organised cloud of ground points
aligned with the labels and the grid cell of each of those pixels; per frame the grid is one table lookup and
one ``np.bincount``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_perception.camera_model import CameraModel, camera_rays

UP = np.array([0.0, 0.0, 1.0])
# the level camera: optical axes (columns) in the ground frame: x right = -y, y down = -z, z forward = +x
LEVEL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
MAX_CELLS = 4_000_000       # 400 x 400 m at 0.2 m; bounds the grid's memory whatever the parameters say
OTHER, FREE, OBSTACLE = 0, 1, 2
FREE_CELL, OBSTACLE_CELL, UNKNOWN_CELL = 0, 100, -1
DEFAULT_FREE = ("Road", "road")  # CamVid, CARLA / Cityscapes


class GroundError(ValueError):
    """The ground cannot be placed (bad pose, no transform); the message says why."""


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class GroundPose:
    """The optical frame in the ground frame: ``p_ground = rotation @ p_optical + translation``."""

    rotation: np.ndarray     # 3x3
    translation: np.ndarray  # the camera centre; its z is the height above the ground

    @classmethod
    def from_angles(cls, height: float, pitch: float, roll: float) -> GroundPose:
        """Camera ``height`` m above the ground frame's origin, heading along its x axis; ``pitch`` (rad)
        positive = optical axis tilted down, then ``roll`` (rad) about the tilted optical axis, positive =
        clockwise as seen from behind the camera."""
        if not (math.isfinite(height) and height > 0):
            raise GroundError(f"ground.camera_height is {height}; it must be > 0 (metres above the ground)")
        for name, angle in (("pitch", pitch), ("roll", roll)):
            if not (math.isfinite(angle) and abs(angle) < math.pi / 2):
                raise GroundError(f"ground.camera_{name} is {angle}; it must be within (-pi/2, pi/2) radians")
        # Tilting down turns the optical z (forward) towards its y (down): a rotation of -pitch about optical x.
        # Clockwise from behind turns optical x (right) towards y (down): +roll about optical z.
        rotation = LEVEL @ _rot_x(-pitch) @ _rot_z(roll)
        return cls(rotation, np.array([0.0, 0.0, height]))

    @classmethod
    def from_transform(cls, translation: Sequence[float], quaternion: Sequence[float]) -> GroundPose:
        """From a TF transform of the optical frame into the ground frame (quaternion x, y, z, w)."""
        t = np.asarray(translation, np.float64)
        q = np.asarray(quaternion, np.float64)
        norm = float(np.linalg.norm(q))
        if not (np.isfinite(t).all() and np.isfinite(q).all() and norm > 1e-6):
            raise GroundError(f"transform translation {t.tolist()} rotation {q.tolist()} is not a valid pose")
        x, y, z, w = q / norm
        rotation = np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])
        if not t[2] > 0:
            raise GroundError(f"the camera is at z = {t[2]:.3f} m in the ground frame; it must be above the "
                              "ground (z > 0)")
        return cls(rotation, t)

    def key(self) -> bytes:
        """Equal for equal poses: a projection is recomputed only when the pose changes."""
        return self.rotation.tobytes() + self.translation.tobytes()


@dataclass(frozen=True)
class GridSpec:
    """The OccupancyGrid's geometry in the ground frame: cell size, extent (m) and the corner of cell (0, 0)."""

    resolution: float = 0.2
    size_x: float = 40.0     # metres along the ground frame's x (the grid's width in cells)
    size_y: float = 40.0     # metres along y (its height in cells)
    origin_x: float = 0.0
    origin_y: float = -20.0

    def __post_init__(self) -> None:
        values = (self.resolution, self.size_x, self.size_y, self.origin_x, self.origin_y)
        if not all(math.isfinite(v) for v in values) or min(self.resolution, self.size_x, self.size_y) <= 0:
            raise GroundError(f"ground grid resolution {self.resolution}, size {self.size_x} x {self.size_y} m: "
                              "all must be finite and > 0")
        if self.cols * self.rows > MAX_CELLS:
            raise GroundError(f"ground grid of {self.cols} x {self.rows} cells is larger than {MAX_CELLS}; "
                              "raise ground.grid_resolution or shrink the grid")

    @property
    def cols(self) -> int:
        return max(1, round(self.size_x / self.resolution))

    @property
    def rows(self) -> int:
        return max(1, round(self.size_y / self.resolution))


def class_kinds(names: Sequence[str], free: Sequence[str], obstacle: Sequence[str]) -> np.ndarray:
    """Lookup table class id (0..255) -> OTHER, FREE or OBSTACLE.

    ``free`` empty = the model's classes named like ``DEFAULT_FREE``; ``obstacle`` empty = every other class
    of the model. Names the model does not have raise ValueError (a typo would silently free nothing).
    """
    index = {name: i for i, name in enumerate(names)}
    for what, given in (("ground.free_classes", free), ("ground.obstacle_classes", obstacle)):
        unknown = [n for n in given if n not in index]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which the model does not have; its classes are "
                             f"{list(names)}")
    free_ids = {index[n] for n in (free or [n for n in DEFAULT_FREE if n in index])}
    if not free_ids:
        raise ValueError(f"the model has no class named {' or '.join(DEFAULT_FREE)}; set ground.free_classes to "
                         f"its drivable classes (its classes are {list(names)})")
    obstacle_ids = {index[n] for n in obstacle} if obstacle else set(range(len(names))) - free_ids
    both = free_ids & obstacle_ids
    if both:
        raise ValueError(f"classes {[names[i] for i in sorted(both)]} are in both ground.free_classes and "
                         "ground.obstacle_classes")
    lut = np.full(256, OTHER, np.uint8)
    lut[sorted(free_ids)] = FREE
    lut[sorted(obstacle_ids)] = OBSTACLE
    return lut


class GroundProjection:
    """The cloud and the grid lookup of one camera model seen from one pose (computed once, used per frame)."""

    def __init__(self, model: CameraModel, stride: int, pose: GroundPose, max_range: float, grid: GridSpec,
                 rays: np.ndarray | None = None) -> None:
        """``rays``: ``camera_rays(model, stride)`` when the caller already has them (they do not depend on the
        pose)."""
        self.model, self.stride, self.grid_spec = model, stride, grid
        rays = camera_rays(model, stride) if rays is None else rays
        up = pose.rotation.T @ UP          # the ground frame's up in the optical frame
        height = float(pose.translation[2])
        down = -(rays @ up)                 # > 0 for rays that descend towards the ground
        with np.errstate(divide="ignore"):
            scale = np.where(down > 1e-12, height / down, np.nan)
        points = rays * scale[..., None]
        hit = np.isfinite(scale) & (np.linalg.norm(points, axis=-1) <= max_range)
        points[~hit] = np.nan
        self.points = points.astype(np.float32)  # [rows, cols, 3], organised, aligned with the sampled labels
        # grid cell of each hitting sample, and that sample's index in the full-resolution label image
        on_ground = points[hit] @ pose.rotation.T + pose.translation
        col = np.floor((on_ground[:, 0] - grid.origin_x) / grid.resolution).astype(np.int64)
        row = np.floor((on_ground[:, 1] - grid.origin_y) / grid.resolution).astype(np.int64)
        inside = (col >= 0) & (col < grid.cols) & (row >= 0) & (row < grid.rows)
        r, c = np.nonzero(hit)
        self._pixel = ((r * stride) * model.width + c * stride)[inside].astype(np.intp)
        cell = (row * grid.cols + col)[inside]
        self._bins = (cell * 3).astype(np.intp)
        # how many pixels fall in each cell does not depend on the labels: a class needs more than half of them
        self._half = np.bincount(cell, minlength=grid.rows * grid.cols) // 2

    def grid(self, labels: np.ndarray, kinds: np.ndarray) -> np.ndarray:
        """int8 [rows, cols] OccupancyGrid cells for one label image: FREE_CELL where more than half the pixels
        falling in a cell are free classes, OBSTACLE_CELL where more than half are obstacles, else UNKNOWN_CELL
        (no pixel, or no majority)."""
        if labels.shape != (self.model.height, self.model.width):
            raise ValueError(f"labels are {labels.shape[1]}x{labels.shape[0]}, the projection is for "
                             f"{self.model.width}x{self.model.height}")
        kind = np.take(kinds, np.take(np.ascontiguousarray(labels).reshape(-1), self._pixel))
        counts = np.bincount(self._bins + kind, minlength=3 * self._half.size)
        cells = np.full(self._half.size, UNKNOWN_CELL, np.int8)
        cells[counts[FREE::3] > self._half] = FREE_CELL
        cells[counts[OBSTACLE::3] > self._half] = OBSTACLE_CELL
        return cells.reshape(self.grid_spec.rows, self.grid_spec.cols)


class TfGround:
    """``ground.source: tf``: the optical frame's pose in ``base_frame`` from a tf2 buffer.

    ``buffer`` is anything with tf2_ros.Buffer's ``lookup_transform(target_frame, source_frame, time)``
    returning a ``geometry_msgs/TransformStamped``; ``time`` is what to pass (``rclpy.time.Time()`` = the
    latest transform, right for a camera fixed to the vehicle). A failed lookup is a GroundError.
    """

    def __init__(self, buffer: Any, base_frame: str, time: Any) -> None:
        self.buffer, self.base_frame, self.time = buffer, base_frame, time

    def pose(self, optical_frame: str) -> GroundPose:
        if not optical_frame:
            raise GroundError("the image has no header.frame_id; ground.source tf needs the camera's optical frame")
        try:
            tf = self.buffer.lookup_transform(self.base_frame, optical_frame, self.time).transform
        except Exception as exc:  # noqa: BLE001 - tf2's Lookup/Connectivity/Extrapolation errors and the like
            raise GroundError(f"no transform {self.base_frame} <- {optical_frame}: {type(exc).__name__}: {exc}") \
                from exc
        t, q = tf.translation, tf.rotation
        return GroundPose.from_transform((t.x, t.y, t.z), (q.x, q.y, q.z, q.w))
