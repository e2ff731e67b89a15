"""``sensor_msgs/Image`` and ``CompressedImage`` <-> NumPy.

Decoding always yields a contiguous uint8 [H, W, 3] **RGB** array (the model contract's order), whatever
the camera sends; anything that cannot be decoded raises ``CodecError`` saying what is wrong and how to
fix it. On a ROS system with ``cv_bridge`` the raw-image conversion goes through it (``BACKEND ==
'cv_bridge'``); otherwise, or with ``use_cv_bridge=False``, through the NumPy/OpenCV path below.

Input is hostile until proven otherwise: ``decode(msg)`` is the one entry point of the node and the bag tool.
Compressed frames are accepted by their magic bytes (JPEG, PNG; never by the ``format`` string), their true size
is read from their own header and checked against ``max_pixels`` before any decoding (``check``, cheap enough
for a subscription callback), and only frames that decode cleanly pass (libjpeg warnings, CRC errors and
truncation are errors). JPEG goes through libjpeg-turbo via ``simplejpeg`` in strict mode, PNG through OpenCV.

Only the message types are imported from ROS, so this module works without a running ROS graph.
"""

from __future__ import annotations

import array
from typing import Any

import cv2
import numpy as np
import simplejpeg  # type: ignore[import-untyped]
from sensor_msgs.msg import Image
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
                         f"{max_pixels}; raise the limit (the node's max_image_pixels, unet-bag's --max-pixels) or "
                         "lower the camera resolution")


def _as_bytes(data: Any) -> np.ndarray:
    """The message's data as a flat uint8 array, without a copy when it supports the buffer protocol."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:  # a plain list of ints, as a hand-made message may carry
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _check_raw(msg: Any, max_pixels: int) -> np.ndarray:
    """The checks of an ``Image`` (encoding, size, step, data length); returns its data as flat uint8."""
    encoding = msg.encoding
    if encoding not in _ENCODINGS:
        raise CodecError(f"encoding '{encoding}' is not supported; supported: {', '.join(SUPPORTED_ENCODINGS)} "
                         "(or publish the CompressedImage topic)")
    channels, dtype, _ = _ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_size(height, width, max_pixels, f"'{encoding}' image")
    if encoding.startswith("bayer_") and min(height, width) < 3:  # OpenCV demosaics smaller frames to black
        raise CodecError(f"'{encoding}' image is {width}x{height}; demosaicing needs at least 3x3 pixels")
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
    return data


def decode_image(msg: Any, max_pixels: int = MAX_PIXELS, use_cv_bridge: bool | None = None) -> np.ndarray:
    """``sensor_msgs/Image`` -> contiguous uint8 [H, W, 3] RGB.

    ``use_cv_bridge``: None uses cv_bridge when it imports (``BACKEND``), False forces the NumPy path.
    An unpadded ``rgb8`` image comes back as a view of ``msg.data`` without a copy (read-only when the
    data is ``bytes``); copy it before writing into it.
    """
    data = _check_raw(msg, max_pixels)
    if use_cv_bridge is None:
        use_cv_bridge = BACKEND == "cv_bridge"
    if use_cv_bridge:
        return _decode_cv_bridge(msg)
    channels, dtype, conversion = _ENCODINGS[msg.encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    rows = data.reshape(height, step)[:, :width * channels * np.dtype(dtype).itemsize]
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


# What a compressed frame may cost to decode is bounded before any decoding: its true dimensions come from its
# own header (<= max_pixels), and a progressive JPEG may have at most this many scans (each scan walks the whole
# coefficient buffer again; encoders write about 10, a hostile file thousands).
MAX_JPEG_SCANS = 64
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# magic bytes of formats OpenCV would decode by content, named in the error so the sender knows what it sent
_OTHER_FORMATS = ((b"RIFF", "WebP or another RIFF container"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
                  (b"BM", "BMP"), (b"GIF8", "GIF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
                  (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"#?RADIANCE", "Radiance HDR"), (b"v/1\x01", "OpenEXR"))


def _sniff(head: bytes) -> str:
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"1234567f":
        return "PNM (PPM/PGM/PBM/PFM)"
    return "an unknown format"


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk, with its fixed CRC


def _png_size(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) from IHDR; a PNG without its IEND chunk is cut off (libpng checks the rest: CRCs, data).

    Constant-time checks in C (no chunk walk in Python, which a frame of a million empty chunks would stall).
    """
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise CodecError(f"{what}: PNG does not start with a valid IHDR chunk; the frame is corrupt")
    if data.rfind(_PNG_IEND, 33) < 0:
        raise CodecError(f"{what}: PNG ends before its IEND chunk ({len(data)} bytes); the frame is truncated")
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def check_compressed(msg: Any, max_pixels: int = MAX_PIXELS) -> tuple[str, bytes, tuple[int, int]]:
    """Cheap checks of a ``CompressedImage`` before any decoding: ``(kind, data, (height, width))``.

    The kind (``"jpeg"`` or ``"png"``) comes from the data's magic bytes, never from ``format``; the size from
    the file's own header as its decoder reads it (a JPEG's SOF even after junk bytes). Everything else raises
    ``CodecError``. Costs one pass over the compressed bytes, whatever size the header claims.
    """
    fmt = str(msg.format)
    what = f"CompressedImage (format '{fmt}')"
    if "compresseddepth" in fmt.lower():
        raise CodecError(f"CompressedImage format '{fmt}' is a depth image; subscribe to a colour camera topic")
    data = _as_bytes(msg.data).tobytes()
    if not data:
        raise CodecError(f"{what} has no data; the publisher sent an empty frame")
    if data.startswith(b"\xff\xd8\xff"):
        try:  # not strict here: the size libjpeg would decode, even when junk before the SOF makes it warn
            height, width, _, _ = simplejpeg.decode_jpeg_header(data, strict=False)
        except Exception as exc:  # noqa: BLE001 - ValueError, or KeyError for a header it cannot name
            raise CodecError(f"{what} is not a decodable JPEG: {exc}") from exc
        _check_size(height, width, max_pixels, f"{what} JPEG")
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise CodecError(f"{what} JPEG has {scans} scans, over the limit of {MAX_JPEG_SCANS}; "
                             "re-encode it as a baseline or ordinary progressive JPEG")
        return "jpeg", data, (height, width)
    if data.startswith(_PNG_SIGNATURE):
        height, width = _png_size(data, what)
        _check_size(height, width, max_pixels, f"{what} PNG")
        return "png", data, (height, width)
    raise CodecError(f"{what} holds {_sniff(data[:16])}, not JPEG or PNG ({len(data)} bytes, first bytes "
                     f"{data[:8].hex()}); only JPEG and PNG are accepted, whatever the format string says")


def decode_compressed(msg: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (JPEG or PNG by content) -> uint8 [H, W, 3] RGB, or ``CodecError``.

    Only frames that decode cleanly pass: a libjpeg warning (truncated or corrupt data), a PNG CRC error or a
    short PNG is an error, never a partly decoded image.
    """
    kind, data, size = check_compressed(msg, max_pixels)
    what = f"CompressedImage (format '{msg.format}', {len(data)} bytes)"
    if kind == "jpeg":
        try:  # strict: every libjpeg warning is an error, and decoding stops at the first
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except Exception as exc:  # noqa: BLE001 - ValueError for libjpeg's errors and warnings, KeyError
            raise CodecError(f"{what} is not a cleanly decodable JPEG: {exc}") from exc
    else:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if bgr is None:
            raise CodecError(f"{what} is not a cleanly decodable PNG (CRC error or data cut short); "
                             "the frame is corrupt")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[:2] != size:  # never expected; a decoder that disagrees with its own header is not trusted
        raise CodecError(f"{what} decoded to {rgb.shape[1]}x{rgb.shape[0]} but its header says "
                         f"{size[1]}x{size[0]}")
    return np.ascontiguousarray(rgb)


def is_compressed(msg: Any) -> bool:
    """True for a ``CompressedImage`` (rclpy or rosbags), False for an ``Image``."""
    return hasattr(msg, "format")


def check(msg: Any, max_pixels: int = MAX_PIXELS) -> None:
    """Everything ``decode`` checks that needs no decoding (bounded cost); only ``CodecError`` comes out."""
    try:
        if is_compressed(msg):
            check_compressed(msg, max_pixels)
        else:
            _check_raw(msg, max_pixels)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed message is bad input, never a crash
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def decode(msg: Any, max_pixels: int = MAX_PIXELS, use_cv_bridge: bool | None = None) -> np.ndarray:
    """Any camera message -> contiguous uint8 [H, W, 3] RGB: the one decode path of the node and the bag tool.

    ``msg`` is an rclpy or a rosbags ``Image`` or ``CompressedImage``. Whatever goes wrong, only ``CodecError``
    comes out: a hostile message is bad input, never a crash.
    """
    try:
        if is_compressed(msg):
            return decode_compressed(msg, max_pixels)
        if not isinstance(msg, Image):  # a rosbags message: cv_bridge takes rclpy messages only
            use_cv_bridge = False
        return decode_image(msg, max_pixels, use_cv_bridge)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a decoder's own failure on crafted data is bad input too
        raise CodecError(f"cannot decode the message: {type(exc).__name__}: {exc}") from exc


def source_encoding(msg: Any) -> str:
    """What ``overlay_encoding`` reads: an Image's ``encoding``, a CompressedImage's ``format``."""
    return str(msg.format if is_compressed(msg) else msg.encoding)


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
