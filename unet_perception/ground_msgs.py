"""ROS messages of the ground projection: the organised PointCloud2 and the OccupancyGrid (no rclpy node here).

The cloud depends only on the CameraInfo and the pose, so :class:`SerializedCloud` serialises it once per
projection and frame_id; per frame only the stamp is written into a copy of those bytes, which rclpy's
``Publisher.publish`` sends as they are (a 640x480 cloud is 3.7 MB: serialising it per frame was most of the
points' cost).
"""

from __future__ import annotations

import array
import struct

import numpy as np
from geometry_msgs.msg import Pose
from nav_msgs.msg import MapMetaData, OccupancyGrid
from sensor_msgs.msg import PointCloud2, PointField
from rclpy.serialization import serialize_message
from std_msgs.msg import Header

from unet_perception.ground import GridSpec

XYZ_FIELDS = tuple(PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                   for i, name in enumerate("xyz"))
POINT_STEP = 12  # three float32


def cloud_data(points: np.ndarray) -> array.array:
    """float32 [rows, cols, 3] -> the PointCloud2 data field (little endian x, y, z per point, row-major)."""
    if points.ndim != 3 or points.shape[2] != 3:
        raise ValueError(f"points must be [rows, cols, 3], got {list(points.shape)}")
    data = array.array("B")
    data.frombytes(np.ascontiguousarray(points, "<f4").tobytes())  # straight into the field's own type
    return data


def point_cloud(data: array.array, rows: int, cols: int, header: Header) -> PointCloud2:
    """An organised cloud (height = rows, width = cols) of x, y, z float32; NaN points make it not dense."""
    if len(data) != rows * cols * POINT_STEP:
        raise ValueError(f"cloud data has {len(data)} bytes, {rows}x{cols} points need {rows * cols * POINT_STEP}")
    msg = PointCloud2(header=header, height=rows, width=cols, fields=list(XYZ_FIELDS), is_bigendian=False,
                      point_step=POINT_STEP, row_step=POINT_STEP * cols, is_dense=False)
    msg.data = data
    return msg


class SerializedCloud:
    """A cloud serialised once (CDR) for one frame_id; :meth:`stamped` gives the bytes of a frame's message."""

    # CDR: a 4-byte encapsulation header (its second byte 1 = little endian), then std_msgs/Header, whose stamp's
    # sec (int32) and nanosec (uint32) come first
    STAMP_OFFSET = 4

    def __init__(self, data: array.array, rows: int, cols: int, frame_id: str) -> None:
        self.frame_id = frame_id
        self._bytes = serialize_message(point_cloud(data, rows, cols, Header(frame_id=frame_id)))
        self._stamp = struct.Struct("<iI" if self._bytes[1] == 1 else ">iI")

    def stamped(self, sec: int, nanosec: int) -> bytes:
        """The serialised message with this stamp: one copy of the cached bytes."""
        end = self.STAMP_OFFSET + self._stamp.size
        view = memoryview(self._bytes)
        return b"".join((view[:self.STAMP_OFFSET], self._stamp.pack(sec, nanosec), view[end:]))


def occupancy_grid(cells: np.ndarray, spec: GridSpec, header: Header) -> OccupancyGrid:
    """int8 [rows, cols] (row = y index, column = x index, as OccupancyGrid's row-major data) -> message.

    ``header.frame_id`` is the grid's frame (``ground.base_frame``); cell (0, 0)'s corner is at the origin.
    """
    rows, cols = cells.shape
    origin = Pose()
    origin.position.x, origin.position.y = float(spec.origin_x), float(spec.origin_y)
    info = MapMetaData(map_load_time=header.stamp, resolution=float(spec.resolution), width=cols, height=rows,
                       origin=origin)
    data = array.array("b")
    data.frombytes(np.ascontiguousarray(cells, np.int8).tobytes())
    msg = OccupancyGrid(header=header, info=info)
    msg.data = data
    return msg
