"""``sensor_msgs/Image`` and ``CompressedImage`` straight from and to their CDR bytes, without rclpy's conversion.

rclpy turns every message a subscription takes into Python objects before the callback runs (for a 640x480 rgb8
frame about as long as a quarter of an inference here), even the frames keep-latest then drops; and it serialises
published messages field by field. A raw subscription (``raw=True``) hands over the serialised bytes instead:
:func:`parse` reads the header and the geometry from them in constant time and keeps the pixels as a view of
those bytes, so only the frame that is inferred is ever touched, by the one copy into the model input. :func:`image`
writes an output message as one join of a small prefix and the NumPy buffer, which a publisher sends as is.

Hostile bytes are expected: every length is checked against the buffer before it is used, so truncated data or a
lying length raises ``CodecError`` naming the field; the values themselves (encoding, size, step, data length) are
then checked by ``codec.check`` exactly as for a deserialised message. Layout: the 4-byte encapsulation header
(CDR or plain XCDR2, either byte order; these two types have no 8-byte fields, so both encodings align the
same), then the fields in order, each primitive aligned to its size from the end of that header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from unet_perception.codec import CodecError

ENCAPSULATION_BYTES = 4
# representation identifier -> little-endian? (CDR_BE, CDR_LE, PLAIN_CDR2_BE, PLAIN_CDR2_LE: DDS-XTypes 1.3 Table 60;
# 1.2's table printed PLAIN_CDR2 as 0x0010/0x0011, which no DDS sends and Fast CDR refuses)
_REPRESENTATIONS = {b"\x00\x00": False, b"\x00\x01": True, b"\x00\x06": False, b"\x00\x07": True}
MAX_STRING = 4096  # frame_id, encoding and format are short names; a longer one is a lie, not a camera
_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}
_STAMP = {True: struct.Struct("<iI"), False: struct.Struct(">iI")}


@dataclass(frozen=True)
class Stamp:
    sec: int
    nanosec: int


@dataclass(frozen=True)
class RawHeader:
    stamp: Stamp
    frame_id: str


@dataclass(frozen=True)
class RawImage:
    """A ``sensor_msgs/Image`` read from CDR; ``data`` is a view of the received bytes (no copy)."""

    header: RawHeader
    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: memoryview


@dataclass(frozen=True)
class RawCompressedImage:
    """A ``sensor_msgs/CompressedImage`` read from CDR; ``data`` is a view of the received bytes."""

    header: RawHeader
    format: str
    data: memoryview


class _Reader:
    """Reads CDR fields from ``buf`` in order; every read is bounded by the buffer's length."""

    def __init__(self, buf: memoryview, what: str) -> None:
        self.what = what
        if len(buf) < ENCAPSULATION_BYTES:
            raise CodecError(f"{what}: {len(buf)} bytes, shorter than the CDR encapsulation header; "
                             "the message is truncated")
        rep = bytes(buf[:2])
        if rep not in _REPRESENTATIONS:
            raise CodecError(f"{what}: CDR representation {rep.hex()} is not plain CDR or XCDR2 "
                             "(a serialiser this node does not read); publish plain CDR")
        self.little = _REPRESENTATIONS[rep]
        self.body = buf[ENCAPSULATION_BYTES:]
        self.pos = 0

    def _take(self, size: int, align: int, field: str) -> int:
        start = self.pos + (-self.pos % align)
        if start + size > len(self.body):
            raise CodecError(f"{self.what}: the message ends inside '{field}' ({len(self.body)} bytes after the "
                             f"CDR header, '{field}' needs {start + size}); the message is truncated")
        self.pos = start + size
        return start

    def u32(self, field: str) -> int:
        return int(_U32[self.little].unpack_from(self.body, self._take(4, 4, field))[0])

    def u8(self, field: str) -> int:
        return int(self.body[self._take(1, 1, field)])

    def stamp(self) -> Stamp:
        sec, nanosec = _STAMP[self.little].unpack_from(self.body, self._take(8, 4, "header.stamp"))
        return Stamp(sec, nanosec)

    def string(self, field: str) -> str:
        size = self.u32(field)
        if size == 0 or size > MAX_STRING:  # CDR counts the terminating NUL, so even "" has size 1
            raise CodecError(f"{self.what}: '{field}' claims {size} bytes (a CDR string has 1..{MAX_STRING} "
                             "with its terminating NUL); the message is corrupt")
        start = self._take(size, 1, field)
        raw = bytes(self.body[start:start + size])
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise CodecError(f"{self.what}: '{field}' is not a NUL-terminated string of {size - 1} characters; "
                             "the message is corrupt")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"{self.what}: '{field}' is not UTF-8 ({exc.reason}); the message is corrupt") from exc

    def octets(self, field: str) -> memoryview:
        size = self.u32(f"{field} length")
        start = self._take(size, 1, field)
        return self.body[start:start + size]

    def header(self) -> RawHeader:
        return RawHeader(self.stamp(), self.string("header.frame_id"))

    def end(self) -> None:
        trailing = len(self.body) - self.pos
        if trailing > 3:  # serialisers may pad the end to 4 bytes, never more
            raise CodecError(f"{self.what}: {trailing} bytes after the last field; the lengths in the message lie")


def parse_image(data: bytes | memoryview) -> RawImage:
    """A serialised ``sensor_msgs/Image`` -> :class:`RawImage` (``CodecError`` when the bytes do not hold one)."""
    r = _Reader(memoryview(data).cast("B"), "Image CDR")
    header = r.header()
    height, width = r.u32("height"), r.u32("width")
    encoding = r.string("encoding")
    is_bigendian = r.u8("is_bigendian")
    step = r.u32("step")
    pixels = r.octets("data")
    r.end()
    return RawImage(header, height, width, encoding, is_bigendian, step, pixels)


def parse_compressed(data: bytes | memoryview) -> RawCompressedImage:
    """A serialised ``sensor_msgs/CompressedImage`` -> :class:`RawCompressedImage` (or ``CodecError``)."""
    r = _Reader(memoryview(data).cast("B"), "CompressedImage CDR")
    header = r.header()
    fmt = r.string("format")
    payload = r.octets("data")
    r.end()
    return RawCompressedImage(header, fmt, payload)


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\x00"
    return _U32[True].pack(len(raw)) + raw


def _pad(size: int) -> bytes:
    return b"\x00" * (-size % 4)


def image(array: np.ndarray, encoding: str, header: RawHeader) -> bytes:
    """uint8 [H, W] or [H, W, C] -> a serialised little-endian CDR ``sensor_msgs/Image`` (one copy of the pixels).

    ``encoding`` is written as given; the caller picks the one that matches the array (``mono8``, ``rgb8``...).
    """
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise CodecError(f"image() writes uint8 [H, W] or [H, W, C] arrays, got {array.dtype} {list(array.shape)}")
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    step = array.strides[0]
    head = b"\x00\x01\x00\x00" + _STAMP[True].pack(header.stamp.sec, header.stamp.nanosec) + _string(header.frame_id)
    head += _pad(len(head) - ENCAPSULATION_BYTES) + struct.pack("<II", height, width) + _string(encoding)
    head += struct.pack("<B", 0)  # is_bigendian
    head += _pad(len(head) - ENCAPSULATION_BYTES) + struct.pack("<II", step, array.nbytes)
    return b"".join((head, array.data))
