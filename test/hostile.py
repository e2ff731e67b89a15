"""Hostile compressed payloads, one per class of attack, made at test time (no stored samples).

Each builder returns the bytes of a ``CompressedImage.data``. ``CLASSES`` names them with the format string an
attacker would send and a phrase the refusal must contain. The sizes are chosen so that a node which decodes them
(OpenCV decodes by content and only warns on corrupt JPEG data) publishes garbage or allocates hundreds of MB.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

BOMB_SIDE = 40_000        # what a few header bytes can claim; OpenCV refuses it with cv2.error (the crash)
HIDDEN_SIDE = 6_000       # 6000x6000: 108 MB per decoded copy, OpenCV accepts it and decodes it in full


def textured(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A smooth but detailed RGB frame, so JPEG entropy data is long enough to corrupt."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (7, 7), 2)


def encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))
    assert ok, ext
    return buf.tobytes()


def ppm_bomb() -> bytes:
    """A PPM header claiming 40000x40000 (4.8 GB), and 16 bytes of pixels."""
    return f"P6\n{BOMB_SIDE} {BOMB_SIDE}\n255\n".encode() + bytes(16)


def bmp_bomb() -> bytes:
    """A BMP header claiming 40000x40000 at 24 bits, and 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, BOMB_SIDE, BOMB_SIDE, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + 16, 0, 0, 14 + len(info)) + info + bytes(16)


def hidden_size_jpeg(side: int = HIDDEN_SIDE) -> bytes:
    """A small JPEG whose SOF claims ``side`` x ``side``, behind junk bytes that stop a naive marker walk."""
    data = bytearray(encode(textured(64, 64), ".jpg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)
    return bytes(data[:sof]) + b"\x00\x11junk" + bytes(data[sof:])


def webp() -> bytes:
    return encode(textured(48, 64), ".webp")


def tiff() -> bytes:
    return encode(textured(48, 64), ".tiff")


def truncated_jpeg() -> bytes:
    """The first half of a JPEG, closed with an end-of-image marker: libjpeg only warns and fills in grey."""
    data = encode(textured(), ".jpg")
    return data[: len(data) // 2] + b"\xff\xd9"


def bitflipped_jpeg() -> bytes:
    """A JPEG with ten bytes of its entropy-coded data flipped: libjpeg warns and decodes garbage."""
    data = bytearray(encode(textured(), ".jpg"))
    start = data.index(b"\xff\xda") + 300
    for k in range(10):
        data[start + 40 * k] ^= 0x55
    return bytes(data)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def truncated_png() -> bytes:
    """A PNG whose image data is cut in half (with a correct CRC) and closed with IEND."""
    data = encode(textured(48, 64), ".png")
    i = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[i:i + 4])[0]
    return data[:i] + _chunk(b"IDAT", data[i + 8:i + 8 + length // 2]) + _chunk(b"IEND", b"")


def bitflipped_png() -> bytes:
    """A PNG with one byte of its image data flipped (its CRC no longer matches)."""
    data = bytearray(encode(textured(48, 64), ".png"))
    data[data.index(b"IDAT") + 40] ^= 0xFF
    return bytes(data)


# name -> (builder, format string the attacker sends, phrase the refusal contains)
CLASSES = {
    "ppm bomb": (ppm_bomb, "jpeg", "PNM"),
    "bmp bomb": (bmp_bomb, "png", "BMP"),
    "hidden-size jpeg": (hidden_size_jpeg, "jpeg", "over the limit"),
    "webp as jpeg": (webp, "jpeg", "WebP"),
    "tiff as png": (tiff, "bgr8; png compressed bgr8", "TIFF"),
    "truncated jpeg": (truncated_jpeg, "jpeg", "not a cleanly decodable JPEG"),
    "bit-flipped jpeg": (bitflipped_jpeg, "rgb8; jpeg compressed bgr8", "not a cleanly decodable JPEG"),
    "truncated png": (truncated_png, "png", "not a cleanly decodable PNG"),
    "bit-flipped png": (bitflipped_png, "png", "not a cleanly decodable PNG"),
}
