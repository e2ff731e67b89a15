"""ROS messages of the ground projection: the organised PointCloud2 and the OccupancyGrid (no rclpy node here).

The cloud's bytes depend only on the CameraInfo and the pose, so :func:`cloud_data` is computed once per
projection and every frame's message reuses it with the frame's header.
"""

from __future__ import annotations

import array

import numpy as np
from geometry_msgs.msg import Pose
from nav_msgs.msg import MapMetaData, OccupancyGrid
from sensor_msgs.msg import PointCloud2, PointField
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
