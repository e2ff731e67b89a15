"""Ground messages (pure units): the cached, stamp-patched cloud bytes are exactly what rclpy would serialise for a
PointCloud2 built field by field here; the OccupancyGrid's layout."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from nav_msgs.msg import OccupancyGrid
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from unet_perception.ground import GridSpec
from unet_perception.ground_msgs import SerializedCloud, cloud_data, occupancy_grid


def reference_cloud(points: np.ndarray, stamp: Time, frame_id: str) -> PointCloud2:
    rows, cols = points.shape[:2]
    msg = PointCloud2(height=rows, width=cols, is_bigendian=False, point_step=12, row_step=12 * cols,
                      is_dense=False)
    msg.header = Header(stamp=stamp, frame_id=frame_id)
    msg.fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                  for n, o in (("x", 0), ("y", 4), ("z", 8))]
    msg.data = points.astype("<f4").tobytes()
    return msg


@pytest.mark.parametrize("stamp", [Time(sec=0, nanosec=0), Time(sec=1_700_000_123, nanosec=999_999_999),
                                   Time(sec=-5, nanosec=7)])
def test_stamped_cloud_bytes_equal_a_serialised_message(stamp: Time) -> None:
    rng = np.random.default_rng(0)
    points = rng.normal(size=(5, 7, 3)).astype(np.float32)
    points[0, :3] = np.nan
    cloud = SerializedCloud(cloud_data(points), 5, 7, "cam_optical")
    got = cloud.stamped(stamp.sec, stamp.nanosec)
    assert got == serialize_message(reference_cloud(points, stamp, "cam_optical"))
    back = deserialize_message(got, PointCloud2)
    assert back.header.stamp == stamp and back.header.frame_id == "cam_optical"
    np.testing.assert_array_equal(np.frombuffer(bytes(back.data), "<f4").reshape(5, 7, 3), points)


def test_occupancy_grid_layout() -> None:
    spec = GridSpec(resolution=0.5, size_x=2.0, size_y=1.5, origin_x=-1.0, origin_y=-0.75)
    cells = np.arange(12, dtype=np.int8).reshape(3, 4)  # rows along y, columns along x
    header = Header(stamp=Time(sec=3, nanosec=4), frame_id="base_link")
    msg = occupancy_grid(cells, spec, header)
    assert isinstance(msg, OccupancyGrid) and msg.header.frame_id == "base_link"
    assert (msg.info.width, msg.info.height, msg.info.resolution) == (4, 3, 0.5)
    assert msg.info.map_load_time == header.stamp
    assert (msg.info.origin.position.x, msg.info.origin.position.y, msg.info.origin.orientation.w) == (-1.0, -0.75, 1.0)
    assert list(msg.data) == list(range(12))  # row-major from cell (0, 0): data[row * width + col]
