"""``unet-demo --ground``: the ground projection on road frames that come without a calibration.

CamVid ships no camera calibration, so the demo **assumes** one and says so in its output: a pinhole camera
without distortion, a 60-degree horizontal field of view (fx = fy = width / (2 tan 30 deg)), the principal point
at the image centre, 1.3 m above the road, pitched 0.05 rad down, no roll. The points and the grid are therefore
an illustration of the pipeline on real labels, not measurements of CamVid's street.

The demo publishes that CameraInfo on ``/camera/camera_info`` (twice a second, as a driver would), starts the
node with ``ground.enabled`` and these parameters, records ``points`` and ``ground_grid`` into the output bag
and draws the last grid as a bird's-eye PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HFOV_DEG = 60.0
HEIGHT_M = 1.3
PITCH_RAD = 0.05
ASSUMPTIONS = (f"CamVid has no calibration: assumed pinhole, {HFOV_DEG:g} deg horizontal field of view, principal "
               f"point at the centre, no distortion, camera {HEIGHT_M:g} m above flat ground, pitch {PITCH_RAD:g} "
               "rad down, roll 0")
INFO_TOPIC = "/camera/camera_info"
POINTS_TOPIC = "/camera/segmentation/points"
GRID_TOPIC = "/camera/segmentation/ground_grid"
TOPICS = {POINTS_TOPIC: "sensor_msgs/msg/PointCloud2", GRID_TOPIC: "nav_msgs/msg/OccupancyGrid"}
COLOURS = {0: (80, 190, 80), 100: (60, 60, 220), -1: (90, 90, 90)}  # BGR: free green, obstacle red, unknown grey


def node_overrides() -> dict[str, Any]:
    """The node parameters of the assumed mounting (source parameters: no TF in the demo)."""
    return {"ground.enabled": True, "ground.source": "parameters", "ground.camera_height": HEIGHT_M,
            "ground.camera_pitch": PITCH_RAD, "ground.camera_roll": 0.0}


def camera_info(width: int, height: int, frame_id: str = "camera") -> Any:
    """The assumed CameraInfo of a ``width`` x ``height`` frame."""
    from sensor_msgs.msg import CameraInfo

    f = width / (2.0 * math.tan(math.radians(HFOV_DEG) / 2.0))
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5,
                     k=[f, 0.0, (width - 1) / 2.0, 0.0, f, (height - 1) / 2.0, 0.0, 0.0, 1.0])
    msg.header.frame_id = frame_id
    return msg


def frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read {path}")
    return image.shape[1], image.shape[0]


def grid_png(msg: Any, path: Path, scale: int = 3) -> str:
    """Bird's-eye PNG of an OccupancyGrid (rosbags message): forward up, the vehicle's left on the left."""
    cells = np.asarray(msg.data, np.int8).reshape(msg.info.height, msg.info.width)  # [y index, x index]
    view = cells.T[::-1, ::-1]  # rows: x from far (top) to near; columns: y from left (+y) to right
    image = np.zeros((*view.shape, 3), np.uint8)
    for value, colour in COLOURS.items():
        image[view == value] = colour
    image = cv2.resize(image, (view.shape[1] * scale, view.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(path), image)
    return str(path)
