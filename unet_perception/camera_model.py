"""A camera's intrinsics from a ``sensor_msgs/CameraInfo``, checked, and the viewing ray of each pixel.

Pure NumPy/OpenCV (no rclpy): the message is read by its field names, so tests and tools can pass any object
with them. Rays are computed once per CameraInfo (OpenCV undistortion of every pixel); the node only looks them up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

PINHOLE_MODELS = ("plumb_bob", "rational_polynomial")  # cv2.undistortPoints (k1 k2 p1 p2 k3 [k4 k5 k6])
FISHEYE_MODEL = "equidistant"                           # cv2.fisheye.undistortPoints (k1 k2 k3 k4)
DISTORTION_MODELS = (*PINHOLE_MODELS, FISHEYE_MODEL)
COEFFICIENTS = {"plumb_bob": (5,), "rational_polynomial": (8,), "equidistant": (4,)}
# Undistortion is an iterative inverse: iterate to well below a thousandth of a pixel (OpenCV's default of 5
# iterations leaves pixels of a strongly distorted lens' corners off by more than the 0.5% the tests allow).
CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)


class CameraInfoError(ValueError):
    """A CameraInfo the ground projection cannot use; the message says which field and why."""


@dataclass(frozen=True)
class CameraModel:
    """What the rays need from a CameraInfo: image size, K (3x3 row-major) and the distortion model."""

    width: int
    height: int
    k: tuple[float, ...]
    d: tuple[float, ...]
    distortion_model: str

    @classmethod
    def from_camera_info(cls, msg: Any, max_pixels: int) -> CameraModel:
        """Checked model from a CameraInfo (or anything with its fields); CameraInfoError naming the problem."""
        width, height = int(msg.width), int(msg.height)
        if width <= 0 or height <= 0 or width * height > max_pixels:
            raise CameraInfoError(f"camera_info size {width}x{height} is empty or larger than max_image_pixels "
                                  f"({max_pixels})")
        if int(getattr(msg, "binning_x", 0)) > 1 or int(getattr(msg, "binning_y", 0)) > 1:
            raise CameraInfoError("camera_info binning is not supported; publish the image at full resolution")
        roi = getattr(msg, "roi", None)
        if roi is not None and int(roi.width) and (int(roi.width), int(roi.height)) != (width, height):
            raise CameraInfoError("camera_info roi (a cropped image) is not supported; publish the full image")
        k = tuple(float(v) for v in msg.k)
        d = tuple(float(v) for v in msg.d)
        model = str(msg.distortion_model)
        return cls(width, height, k, d, model).checked()

    def checked(self) -> CameraModel:
        k = self.k
        if len(k) != 9 or not all(math.isfinite(v) for v in k):
            raise CameraInfoError(f"camera_info K {list(k)} is not 9 finite numbers")
        fx, fy = k[0], k[4]
        if not (fx > 0 and fy > 0):
            raise CameraInfoError(f"camera_info focal lengths fx={fx}, fy={fy} must be > 0 (is the camera "
                                  "calibrated? an uncalibrated driver sends K = 0)")
        if (k[1], k[3], k[6], k[7], k[8]) != (0.0, 0.0, 0.0, 0.0, 1.0):
            raise CameraInfoError(f"camera_info K {list(k)} is not [fx 0 cx 0 fy cy 0 0 1] (skew is not supported)")
        if not all(math.isfinite(v) for v in self.d):
            raise CameraInfoError(f"camera_info D {list(self.d)} has a NaN or infinite coefficient")
        if self.distortion_model in DISTORTION_MODELS:
            if len(self.d) not in COEFFICIENTS[self.distortion_model]:
                raise CameraInfoError(f"camera_info distortion_model '{self.distortion_model}' needs "
                                      f"{COEFFICIENTS[self.distortion_model][0]} coefficients in D, got "
                                      f"{len(self.d)}")
        elif any(self.d):  # drivers of uncalibrated or rectified cameras send '' (or 'none') with no distortion
            raise CameraInfoError(f"camera_info distortion_model '{self.distortion_model}' is not one of "
                                  f"{', '.join(DISTORTION_MODELS)}")
        return self

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.k, np.float64).reshape(3, 3)

    @property
    def distorted(self) -> bool:
        return self.distortion_model in DISTORTION_MODELS and any(self.d)


def sample_pixels(width: int, height: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel columns and rows of the organised cloud: row r / column c is pixel (c * stride, r * stride)."""
    return np.arange(0, width, stride), np.arange(0, height, stride)


def undistort(model: CameraModel, pixels: np.ndarray) -> np.ndarray:
    """Pixel coordinates [N, 2] -> normalised image coordinates [N, 2] (x/z, y/z of the ray) of ``model``."""
    src = np.ascontiguousarray(pixels, np.float64).reshape(-1, 1, 2)
    if not model.distorted:
        fx, _, cx, _, fy, cy = model.k[:6]
        return (src.reshape(-1, 2) - (cx, cy)) / (fx, fy)
    d = np.asarray(model.d, np.float64)
    if model.distortion_model == FISHEYE_MODEL:
        out = cv2.fisheye.undistortPoints(src, model.matrix, d, criteria=CRITERIA)
    else:
        out = cv2.undistortPoints(src, model.matrix, d, criteria=CRITERIA)
    return np.asarray(out, np.float64).reshape(-1, 2)


def camera_rays(model: CameraModel, stride: int) -> np.ndarray:
    """Ray direction (x, y, 1) in the optical frame of each sampled pixel: float64 [rows, cols, 3]."""
    cols, rows = sample_pixels(model.width, model.height, stride)
    u, v = np.meshgrid(cols, rows)
    xy = undistort(model, np.stack([u.ravel(), v.ravel()], axis=1))
    rays = np.ones((rows.size, cols.size, 3), np.float64)
    rays[..., :2] = xy.reshape(rows.size, cols.size, 2)
    return rays


def check_size(model: CameraModel, size: Sequence[int]) -> None:
    """CameraInfoError unless a frame of ``size`` (width, height) is the size the CameraInfo describes."""
    if (model.width, model.height) != tuple(size):
        raise CameraInfoError(f"frame is {size[0]}x{size[1]} but camera_info says {model.width}x{model.height}")
