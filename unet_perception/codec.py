"""``sensor_msgs/Image`` and ``CompressedImage`` <-> NumPy.

Decoding always yields a contiguous uint8 [H, W, 3] **RGB** array (the model contract's order), whatever
the camera sends; anything that cannot be decoded raises ``CodecError`` saying what is wrong and how to
fix it. On a ROS system with ``cv_bridge`` the raw-image conversion goes through it (``BACKEND ==
'cv_bridge'``); otherwise, or with ``use_cv_bridge=False``, through the NumPy/OpenCV path below.

Only the message types are imported from ROS, so this module works without a running ROS graph.
"""

from __future__ import annotations

import array
import struct
from typing import Any

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

try:  # a real ROS install; the PyPI wheels have no cv_bridge
    from cv_bridge import CvBridge, CvBridgeError
except ImportError:  # pragma: no cover - depends on the machine
    _BRIDGE = None
    BACKEND = "numpy"
else:  # pragma: no cover - depends on the machine
    _BRIDGE = CvBridge()
    BACKEND = "cv_bridge"

MAX_PIXELS = 4096 * 4096

# encoding -> (channels, numpy dtype of one channel, cv2 conversion to RGB or None when already RGB).
# 16-bit colour is reduced to 8 bits by keeping the high byte (>> 8), like image_view does.
_ENCODINGS: dict[str, tuple[int, str, int | None]] = {
    "rgb8": (3, "u1", None),
    "bgr8": (3, "u1", cv2.COLOR_BGR2RGB),
    "rgba8": (4, "u1", cv2.COLOR_RGBA2RGB),
    "bgra8": (4, "u1", cv2.COLOR_BGRA2RGB),
    "mono8": (1, "u1", cv2.COLOR_GRAY2RGB),
    "mono16": (1, "u2", cv2.COLOR_GRAY2RGB),
    "rgb16": (3, "u2", None),
    "bgr16": (3, "u2", cv2.COLOR_BGR2RGB),
    "rgba16": (4, "u2", cv2.COLOR_RGBA2RGB),
    "bgra16": (4, "u2", cv2.COLOR_BGRA2RGB),
    # packed 4:2:2, two bytes per pixel; ROS 'yuv422' is UYVY (as in cv_bridge)
    "yuv422": (2, "u1", cv2.COLOR_YUV2RGB_UYVY),
    "uyvy": (2, "u1", cv2.COLOR_YUV2RGB_UYVY),
    "yuv422_yuy2": (2, "u1", cv2.COLOR_YUV2RGB_YUY2),
    "yuyv": (2, "u1", cv2.COLOR_YUV2RGB_YUY2),
    # OpenCV names Bayer patterns by the second row's first two pixels, hence the apparent swap (as cv_bridge)
    "bayer_rggb8": (1, "u1", cv2.COLOR_BayerBG2RGB),
    "bayer_bggr8": (1, "u1", cv2.COLOR_BayerRG2RGB),
    "bayer_gbrg8": (1, "u1", cv2.COLOR_BayerGR2RGB),
    "bayer_grbg8": (1, "u1", cv2.COLOR_BayerGB2RGB),
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)
_PACKED_422 = ("yuv422", "uyvy", "yuv422_yuy2", "yuyv")
_BGR_FAMILY = ("bgr8", "bgra8", "bgr16", "bgra16")
# what encode_image writes: encoding -> array rank
_OUTPUT_ENCODINGS = {"mono8": 2, "rgb8": 3, "bgr8": 3}


class CodecError(ValueError):
    """A message that cannot be converted, with what is wrong and how to fix it."""


def _check_size(height: int, width: int, max_pixels: int, what: str) -> None:
    if height <= 0 or width <= 0:
        raise CodecError(f"{what} is {width}x{height}; width and height must be > 0 (is the camera driver "
                         "publishing empty frames?)")
    if height * width > max_pixels:
        raise CodecError(f"{what} is {width}x{height} = {height * width} pixels, over the limit of "
                         f"{max_pixels}; raise max_pixels or lower the camera resolution")


def _as_bytes(data: Any) -> np.ndarray:
    """The message's data as a flat uint8 array, without a copy when it supports the buffer protocol."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a plain list of ints, as a hand-made message may carry
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def decode_image(msg: Image, max_pixels: int = MAX_PIXELS, use_cv_bridge: bool | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` -> contiguous uint8 [H, W, 3] RGB.

    ``use_cv_bridge``: None uses cv_bridge when it imports (``BACKEND``), False forces the NumPy path.
    An unpadded ``rgb8`` image comes back as a view of ``msg.data`` without a copy (read-only when the
    data is ``bytes``); copy it before writing into it.
    """
    encoding = msg.encoding
    if encoding not in _ENCODINGS:
        raise CodecError(f"encoding '{encoding}' is not supported; supported: {', '.join(SUPPORTED_ENCODINGS)} "
                         "(or publish the CompressedImage topic)")
    channels, dtype, conversion = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(height, width, max_pixels, f"'{encoding}' image")
    if encoding in _PACKED_422 and width % 2:
        raise CodecError(f"'{encoding}' image has odd width {width}; packed 4:2:2 needs an even width "
                         "(configure the camera for an even width)")
    row_bytes = width * channels * np.dtype(dtype).itemsize
    if step < row_bytes:
        raise CodecError(f"'{encoding}' image {width}x{height} has step {step}, less than one row "
                         f"({width} px * {row_bytes // width} bytes = {row_bytes}); the publisher sets step wrongly")
    data = _as_bytes(msg.data)
    if data.size != height * step:
        raise CodecError(f"'{encoding}' image {width}x{height} with step {step} needs {height * step} bytes of "
                         f"data, got {data.size}; the message is truncated or its step/height are wrong")
    if use_cv_bridge is None:
        use_cv_bridge = BACKEND == "cv_bridge"
    if use_cv_bridge:
        return _decode_cv_bridge(msg)
    rows = data.reshape(height, step)[:, :row_bytes]
    if dtype == "u2":
        order = ">" if msg.is_bigendian else "<"
        rows = (rows.view(order + "u2") >> 8).astype(np.uint8)
    pixels = rows.reshape(height, width, channels)
    if conversion is None:
        return np.ascontiguousarray(pixels)
    return cv2.cvtColor(pixels if channels > 1 else pixels[:, :, 0], conversion)


def _decode_cv_bridge(msg: Image) -> np.ndarray:
    if _BRIDGE is None:
        raise CodecError("use_cv_bridge=True but cv_bridge is not importable; install ros-jazzy-cv-bridge "
                         "or leave use_cv_bridge unset to use the NumPy path")
    try:  # pragma: no cover - needs a ROS install with cv_bridge
        return np.ascontiguousarray(_BRIDGE.imgmsg_to_cv2(msg, "rgb8"))
    except (CvBridgeError, cv2.error, TypeError, ValueError) as exc:
        raise CodecError(f"cv_bridge cannot convert the '{msg.encoding}' image to rgb8: {exc}") from exc


def _compressed_size(data: np.ndarray) -> tuple[int, int] | None:
    """(height, width) from a PNG or JPEG header, read before decoding so huge frames are refused cheaply."""
    head = data[:32].tobytes()
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    if not head.startswith(b"\xff\xd8"):
        return None
    buf, i = data, 2
    while i + 9 <= buf.size:
        if buf[i] != 0xFF:
            return None
        marker = int(buf[i + 1])
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (int(buf[i + 2]) << 8) | int(buf[i + 3])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            return (int(buf[i + 5]) << 8) | int(buf[i + 6]), (int(buf[i + 7]) << 8) | int(buf[i + 8])
        i += 2 + length
    return None


def decode_compressed(msg: CompressedImage, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG, any image_transport ``format``) -> uint8 [H, W, 3] RGB."""
    fmt = msg.format
    if "compresseddepth" in fmt.lower():
        raise CodecError(f"CompressedImage format '{fmt}' is a depth image; subscribe to a colour camera topic")
    data = _as_bytes(msg.data)
    if data.size == 0:
        raise CodecError(f"CompressedImage (format '{fmt}') has no data; the publisher sent an empty frame")
    size = _compressed_size(data)
    if size is not None:
        _check_size(size[0], size[1], max_pixels, f"compressed '{fmt}' image")
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if bgr is None:
        raise CodecError(f"CompressedImage (format '{fmt}', {data.size} bytes) is not a decodable JPEG or PNG; "
                         "the data is corrupt or in a format OpenCV cannot read")
    _check_size(bgr.shape[0], bgr.shape[1], max_pixels, f"compressed '{fmt}' image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, encoding: str, header: Header) -> Image:
    """uint8 [H, W] (``mono8``) or [H, W, 3] (``rgb8``, ``bgr8``, already in that order) -> ``sensor_msgs/Image``."""
    if encoding not in _OUTPUT_ENCODINGS:
        raise CodecError(f"cannot encode '{encoding}'; encode_image writes {', '.join(_OUTPUT_ENCODINGS)}")
    rank = _OUTPUT_ENCODINGS[encoding]
    if image.dtype != np.uint8 or image.ndim != rank or (rank == 3 and image.shape[2] != 3):
        want = "[H, W]" if rank == 2 else "[H, W, 3]"
        raise CodecError(f"'{encoding}' needs a uint8 {want} array, got {image.dtype} {list(image.shape)}")
    image = np.ascontiguousarray(image)
    data = array.array("B")
    # One copy, straight into the field's own array type: the setter then stores it as is, whereas bytes
    # would be copied again (and checked byte by byte in Python under ROS_PYTHON_CHECK_FIELDS=1).
    data.frombytes(image.data)
    msg = Image(header=header, height=image.shape[0], width=image.shape[1], encoding=encoding,
                is_bigendian=0, step=image.strides[0])
    msg.data = data
    return msg


def overlay_encoding(input_encoding: str) -> str:
    """Encoding of the overlay topic: ``bgr8`` for a BGR-family input, else ``rgb8``.

    ``input_encoding`` is an Image's ``encoding`` or a CompressedImage's ``format``; image_transport
    writes the original encoding before ``;`` (``"bgr8; jpeg compressed bgr8"``), so that part decides.
    A bare ``"jpeg"``/``"png"`` format names no family and gets ``rgb8``.
    """
    original = input_encoding.split(";", 1)[0].strip()
    return "bgr8" if original in _BGR_FAMILY else "rgb8"
