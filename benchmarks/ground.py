"""Cost of the ground projection per frame (points + grid messages) and once per CameraInfo, on this machine.

    python benchmarks/ground.py [--size 640x480] [--stride 1] [--iterations 100] [--distortion plumb_bob]

Per frame the node does what is timed here: the points message's bytes from the cached serialised cloud with the
frame's stamp (published as they are), the grid lookup over the labels and its OccupancyGrid, serialised (what
publish costs on top). Once per
CameraInfo (and per pose change under ground.source tf) it computes the rays and the projection: timed apart.
Labels are a rendered road scene (road in the lower middle, obstacles beside it), so cells see mixed classes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import numpy as np
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CameraInfo
from std_msgs.msg import Header

from unet_perception.camera_model import CameraModel, camera_rays
from unet_perception.ground import GridSpec, GroundPose, GroundProjection, class_kinds
from unet_perception.ground_msgs import SerializedCloud, cloud_data, occupancy_grid

CAMVID = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
          "Bicyclist")
DISTORTION = {"none": ("plumb_bob", [0.0] * 5), "plumb_bob": ("plumb_bob", [-0.28, 0.09, 0.001, -0.001, -0.015]),
              "equidistant": ("equidistant", [0.08, -0.03, 0.01, -0.002])}


def timed(fn: Callable[[], object], iterations: int) -> tuple[float, float, float]:
    """Min, mean and p99 in ms (on a shared machine the min is the closest to the cost on an idle one)."""
    fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return float(np.min(times)), float(np.mean(times)), float(np.percentile(times, 99))


def road_labels(width: int, height: int) -> np.ndarray:
    labels = np.zeros((height, width), np.uint8)  # sky
    labels[height // 2:] = 1                       # building
    u = np.arange(width)[None, :]
    v = np.arange(height)[:, None]
    road = (v > height // 2) & (np.abs(u - width / 2) < (v - height / 2) * 1.2)
    labels[np.broadcast_to(road, labels.shape)] = 3
    rng = np.random.default_rng(0)
    for _ in range(6):  # cars
        x, y = int(rng.integers(0, width - 60)), int(rng.integers(height // 2, height - 40))
        labels[y:y + 40, x:x + 60] = 8
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT (default: %(default)s)")
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--distortion", choices=sorted(DISTORTION), default="plumb_bob")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    model_name, d = DISTORTION[args.distortion]
    info = CameraInfo(width=width, height=height, distortion_model=model_name, d=d,
                      k=[0.8 * width, 0.0, width / 2, 0.0, 0.8 * width, height / 2, 0.0, 0.0, 1.0])
    pose = GroundPose.from_angles(1.5, 0.1, 0.02)
    spec = GridSpec()  # node defaults: 0.2 m, 40 x 40 m ahead
    kinds = class_kinds(CAMVID, [], [])
    labels = road_labels(width, height)
    header = Header(frame_id="camera_optical")

    model = CameraModel.from_camera_info(info, 1 << 30)
    start = time.perf_counter()
    rays = camera_rays(model, args.stride)
    rays_ms = (time.perf_counter() - start) * 1000.0
    start = time.perf_counter()
    proj = GroundProjection(model, args.stride, pose, 40.0, spec, rays)
    rows, cols = proj.points.shape[:2]
    cloud = SerializedCloud(cloud_data(proj.points), rows, cols, header.frame_id)
    proj_ms = (time.perf_counter() - start) * 1000.0

    def points() -> bytes:
        return cloud.stamped(1_700_000_000, 5)

    def grid() -> bytes:
        return serialize_message(occupancy_grid(proj.grid(labels, kinds), spec, header))

    def both() -> None:
        points()
        grid()

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {width}x{height}, stride {args.stride}, "
          f"distortion {args.distortion}, grid {spec.cols}x{spec.rows} cells")
    print(f"once per CameraInfo: rays {rays_ms:.1f} ms, projection + serialised cloud {proj_ms:.1f} ms")
    for name, fn in (("points (stamped cached bytes)", points), ("grid (lookup + OccupancyGrid + serialise)",
                                                                   grid), ("per frame, both", both)):
        low, mean, p99 = timed(fn, args.iterations)
        print(f"{name:45s} min {low:6.2f} ms  mean {mean:6.2f} ms  p99 {p99:6.2f} ms")


if __name__ == "__main__":
    main()
