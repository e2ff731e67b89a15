"""raw_cdr against rclpy's own (de)serialisation, the independent reference: every supported encoding, compressed
images, odd frame_id lengths (alignment), padded rows; the writer read back by rclpy; and hostile bytes."""

from __future__ import annotations

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image

from hostile import encode, textured
from unet_perception import raw_cdr
from unet_perception.codec import SUPPORTED_ENCODINGS, CodecError, decode

# bytes per pixel, written out here rather than taken from codec's table
BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "mono16": 2, "rgb16": 6, "bgr16": 6,
                   "rgba16": 8, "bgra16": 8, "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2,
                   "bayer_rggb8": 1, "bayer_bggr8": 1, "bayer_gbrg8": 1, "bayer_grbg8": 1}
FRAME_IDS = ("", "c", "ca", "cam", "cam_optical_frame")  # every alignment of the fields after frame_id


def image_msg(encoding: str, frame_id: str, pad: int = 0, big_endian: int = 0, seed: int = 0) -> Image:
    height, width = 6, 8
    step = width * BYTES_PER_PIXEL[encoding] + pad
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=big_endian, step=step)
    msg.data = np.random.default_rng(seed).integers(0, 256, height * step, dtype=np.uint8).tobytes()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000 + seed, 999_999_999 - seed
    return msg


def assert_same_image(raw: raw_cdr.RawImage, ref: Image) -> None:
    assert (raw.header.stamp.sec, raw.header.stamp.nanosec, raw.header.frame_id) == \
        (ref.header.stamp.sec, ref.header.stamp.nanosec, ref.header.frame_id)
    assert (raw.height, raw.width, raw.encoding, raw.is_bigendian, raw.step) == \
        (ref.height, ref.width, ref.encoding, ref.is_bigendian, ref.step)
    assert bytes(raw.data) == bytes(ref.data)


@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
def test_every_encoding_reads_as_rclpy_deserialises_it(encoding: str) -> None:
    assert set(SUPPORTED_ENCODINGS) == set(BYTES_PER_PIXEL)
    for k, frame_id in enumerate(FRAME_IDS):
        for pad in (0, 3):
            msg = image_msg(encoding, frame_id, pad, big_endian=k % 2, seed=k)
            data = serialize_message(msg)
            ref = deserialize_message(data, Image)
            raw = raw_cdr.parse_image(data)
            assert_same_image(raw, ref)
            np.testing.assert_array_equal(decode(raw), decode(ref, use_cv_bridge=False))


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_compressed_reads_as_rclpy_deserialises_it(kind: str) -> None:
    for frame_id in FRAME_IDS:
        msg = CompressedImage(format=f"rgb8; {kind} compressed bgr8")
        msg.data = encode(textured(48, 64), f".{'jpg' if kind == 'jpeg' else 'png'}")
        msg.header.frame_id = frame_id
        msg.header.stamp.sec = 42
        data = serialize_message(msg)
        ref = deserialize_message(data, CompressedImage)
        raw = raw_cdr.parse_compressed(data)
        assert (raw.header.stamp.sec, raw.header.frame_id, raw.format) == (42, ref.header.frame_id, ref.format)
        assert bytes(raw.data) == bytes(ref.data)
        np.testing.assert_array_equal(decode(raw), decode(ref))


def test_pixels_are_a_view_not_a_copy() -> None:
    data = serialize_message(image_msg("rgb8", "cam"))
    raw = raw_cdr.parse_image(data)
    assert raw.data.obj is data  # the memoryview looks into the received bytes


@pytest.mark.parametrize(("shape", "encoding"), [((6, 8), "mono8"), ((6, 8, 3), "rgb8"), ((5, 7, 3), "bgr8")])
def test_written_images_deserialise_in_rclpy(shape: tuple[int, ...], encoding: str) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for frame_id in FRAME_IDS:
        header = raw_cdr.RawHeader(raw_cdr.Stamp(-5, 123), frame_id)
        msg = deserialize_message(raw_cdr.image(array, encoding, header), Image)
        assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (-5, 123, frame_id)
        assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (shape[0], shape[1], encoding, 0)
        assert msg.step == shape[1] * (shape[2] if len(shape) == 3 else 1)
        np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(shape), array)


def test_big_endian_cdr() -> None:
    """A big-endian CDR stream (CDR_BE), built by hand with big-endian lengths."""
    body = (b"\x00\x00\x00\x07" b"\x00\x00\x00\x09" b"\x00\x00\x00\x02c\x00" b"\x00\x00"
            b"\x00\x00\x00\x01" b"\x00\x00\x00\x02" b"\x00\x00\x00\x06mono8\x00" b"\x00" b"\x00"
            b"\x00\x00\x00\x02" b"\x00\x00\x00\x02" b"\x0a\x0b")
    raw = raw_cdr.parse_image(b"\x00\x00\x00\x00" + body)
    assert (raw.header.stamp.sec, raw.header.stamp.nanosec, raw.header.frame_id) == (7, 9, "c")
    assert (raw.height, raw.width, raw.encoding, raw.step, bytes(raw.data)) == (1, 2, "mono8", 2, b"\x0a\x0b")


def test_plain_xcdr2_is_read_by_its_real_representation_ids() -> None:
    """PLAIN_CDR2 is 0x0006 (BE) / 0x0007 (LE) (DDS-XTypes 1.3 Table 60, Fast CDR's PLAIN_CDR2 = 0x6): a writer
    configured for XCDR2 sends those. For these types the body is the same as XCDR1's (no 8-byte fields); rclpy's
    Fast CDR reads the LE one, and refuses 0x0011, the XTypes 1.2 table's misprint. Before, raw_cdr took 0x0010 and
    0x0011 for XCDR2 and refused the real ids as 'not plain CDR or XCDR2'."""
    msg = image_msg("mono8", "cam")
    data = serialize_message(msg)
    xcdr2_le = b"\x00\x07" + data[2:]
    assert_same_image(raw_cdr.parse_image(xcdr2_le), deserialize_message(xcdr2_le, Image))
    be_body = (b"\x00\x00\x00\x07" b"\x00\x00\x00\x09" b"\x00\x00\x00\x02c\x00" b"\x00\x00"
               b"\x00\x00\x00\x01" b"\x00\x00\x00\x02" b"\x00\x00\x00\x06mono8\x00" b"\x00" b"\x00"
               b"\x00\x00\x00\x02" b"\x00\x00\x00\x02" b"\x0a\x0b")
    raw = raw_cdr.parse_image(b"\x00\x06\x00\x00" + be_body)
    assert (raw.header.frame_id, raw.height, raw.width, raw.encoding, bytes(raw.data)) == \
        ("c", 1, 2, "mono8", b"\x0a\x0b")
    for misprint in (b"\x00\x10", b"\x00\x11"):
        with pytest.raises(RuntimeError, match="failed to deserialize"):  # the reference refuses it too
            deserialize_message(misprint + data[2:], Image)
        with pytest.raises(CodecError, match="not plain CDR"):
            raw_cdr.parse_image(misprint + data[2:])


def test_every_truncation_is_refused() -> None:
    """Every prefix of a message is refused with CodecError (never IndexError, struct.error, a crash)."""
    for parse, msg in ((raw_cdr.parse_image, image_msg("rgb8", "cam")),
                       (raw_cdr.parse_compressed, CompressedImage(format="png", data=b"\x89PNG1234"))):
        data = serialize_message(msg)
        for cut in range(len(data) - 4):  # up to 3 bytes of end padding may go
            with pytest.raises(CodecError):
                parse(data[:cut])


def lie(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(4, "little") + data[offset + 4:]


def test_lying_lengths_and_corrupt_fields_are_refused() -> None:
    msg = image_msg("mono8", "cam")  # 6x8 mono8: 48 bytes of pixels
    data = serialize_message(msg)
    frame_id_at = 4 + 8
    data_len_at = len(data) - 48 - 4
    cases = {
        "frame_id past the end": (lie(data, frame_id_at, 200), "ends inside 'header.frame_id'"),
        "frame_id too long": (lie(data, frame_id_at, raw_cdr.MAX_STRING + 1), "claims"),
        "frame_id of size 0": (lie(data, frame_id_at, 0), "claims 0 bytes"),
        "data past the end": (lie(data, data_len_at, 49), "ends inside 'data'"),
        "data length huge": (lie(data, data_len_at, 0xFFFFFFFF), "ends inside 'data'"),
        "data shorter than sent": (lie(data, data_len_at, 40), "bytes after the last field"),
        "unknown representation": (b"\x00\x03" + data[2:], "not plain CDR"),
        "no NUL": (data[:frame_id_at + 4 + 3] + b"X" + data[frame_id_at + 8:], "NUL-terminated"),
        "not UTF-8": (data[:frame_id_at + 4] + b"\xff\xfe\xfd" + data[frame_id_at + 7:], "not UTF-8"),
    }
    for name, (bad, needle) in cases.items():
        with pytest.raises(CodecError, match=needle):
            raw_cdr.parse_image(bad)
        assert len(bad) == len(data), name
