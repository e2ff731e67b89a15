"""codec: every supported encoding decodes to the right RGB pixels, every bad message raises CodecError."""

from __future__ import annotations

import array

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

import hostile
from unet_perception import codec
from unet_perception.codec import (CodecError, check, decode, decode_compressed, decode_image, encode_image,
                                   overlay_encoding, source_encoding)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)


def image_msg(pixels: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image holding ``pixels`` ([H, W] or [H, W, C], any dtype) with ``pad`` garbage bytes per row."""
    h, w = pixels.shape[:2]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if bigendian else "<"))
    rows = pixels.reshape(h, -1).view(np.uint8)
    rows = np.hstack([rows, np.full((h, pad), 0xAB, dtype=np.uint8)])
    return Image(height=h, width=w, encoding=encoding, is_bigendian=int(bigendian), step=rows.shape[1],
                 data=rows.tobytes())


def compressed_msg(rgb: np.ndarray, ext: str, fmt: str) -> CompressedImage:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return CompressedImage(format=fmt, data=buf.tobytes())


# -- raw images --------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, pixels", [
    ("rgb8", RGB),
    ("bgr8", RGB[:, :, ::-1]),
    ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])),
    ("bgra8", np.dstack([RGB[:, :, ::-1], np.full(RGB.shape[:2], 7, np.uint8)])),
])
@pytest.mark.parametrize("pad", [0, 5])
def test_8bit_colour_encodings_give_rgb(encoding: str, pixels: np.ndarray, pad: int) -> None:
    out = decode_image(image_msg(pixels, encoding, pad), use_cv_bridge=False)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


def test_mono8_is_replicated_to_three_channels() -> None:
    gray = RGB[:, :, 0]
    out = decode_image(image_msg(gray, "mono8", pad=3), use_cv_bridge=False)
    np.testing.assert_array_equal(out, np.dstack([gray] * 3))


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("encoding, order", [("mono16", None), ("rgb16", slice(None)),
                                             ("bgr16", slice(None, None, -1))])
def test_16bit_encodings_keep_the_high_byte(encoding: str, order: slice | None, bigendian: bool) -> None:
    wide = RNG.integers(0, 65536, (4, 6, 3), dtype=np.uint16)
    pixels = wide[:, :, 0] if order is None else wide[:, :, order]
    out = decode_image(image_msg(pixels, encoding, pad=2, bigendian=bigendian), use_cv_bridge=False)
    expected = (wide >> 8).astype(np.uint8)
    if order is None:
        expected = np.dstack([expected[:, :, 0]] * 3)
    np.testing.assert_array_equal(out, expected)


# BT.601 studio-swing YUV of pure red: Y=81, U=90, V=240.
@pytest.mark.parametrize("encoding, macropixel", [
    ("yuv422", [90, 81, 240, 81]), ("uyvy", [90, 81, 240, 81]),
    ("yuv422_yuy2", [81, 90, 81, 240]), ("yuyv", [81, 90, 81, 240]),
])
def test_packed_yuv422_decodes_red(encoding: str, macropixel: list[int]) -> None:
    h, w = 4, 8
    msg = Image(height=h, width=w, encoding=encoding, step=2 * w, data=bytes(macropixel * (h * w // 2)))
    out = decode_image(msg, use_cv_bridge=False)
    assert out.shape == (h, w, 3)
    r, g, b = (out[..., i].astype(int) for i in range(3))
    assert (r > 230).all() and (g < 25).all() and (b < 25).all(), out[0, 0]


@pytest.mark.parametrize("encoding, red_at", [("bayer_rggb8", (0, 0)), ("bayer_bggr8", (1, 1)),
                                              ("bayer_gbrg8", (1, 0)), ("bayer_grbg8", (0, 1))])
def test_bayer_mosaic_of_a_red_scene_decodes_red(encoding: str, red_at: tuple[int, int]) -> None:
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[red_at[0]::2, red_at[1]::2] = 200  # only the red sites see light
    out = decode_image(image_msg(mosaic, encoding), use_cv_bridge=False)
    inner = out[2:-2, 2:-2].reshape(-1, 3)
    np.testing.assert_array_equal(inner, np.tile([200, 0, 0], (len(inner), 1)))


def test_data_given_as_a_list_of_ints_decodes() -> None:
    msg = Image(height=1, width=2, encoding="rgb8", step=6)
    msg.data = [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(decode_image(msg, use_cv_bridge=False), [[[1, 2, 3], [4, 5, 6]]])


def test_default_path_is_the_available_backend() -> None:
    assert codec.BACKEND in ("numpy", "cv_bridge")
    msg = image_msg(RGB[:, :, ::-1], "bgr8", pad=1)
    np.testing.assert_array_equal(decode_image(msg), RGB)
    if codec.BACKEND == "numpy":
        with pytest.raises(CodecError, match="cv_bridge is not importable; install ros-jazzy-cv-bridge"):
            decode_image(msg, use_cv_bridge=True)


@pytest.mark.parametrize("change, match", [
    ({"encoding": "yuv420"}, r"encoding 'yuv420' is not supported; supported: rgb8, bgr8"),
    ({"encoding": "32FC1"}, r"not supported"),
    ({"width": 0, "step": 0, "data": b""}, r"0x6; width and height must be > 0"),
    ({"height": 0, "data": b""}, r"10x0"),
    ({"step": 29}, r"step 29, less than one row .* = 30"),
    ({"data": bytes(6 * 30 - 1)}, r"needs 180 bytes of data, got 179"),
    ({"data": bytes(6 * 30 + 30)}, r"needs 180 bytes of data, got 210"),
])
def test_bad_images_raise_codec_error(change: dict, match: str) -> None:
    msg = image_msg(RGB, "rgb8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(CodecError, match=match):
        decode_image(msg, use_cv_bridge=False)


def test_odd_width_yuv422_is_refused() -> None:
    msg = Image(height=2, width=3, encoding="yuv422", step=6, data=bytes(12))
    with pytest.raises(CodecError, match="odd width 3; packed 4:2:2 needs an even width"):
        decode_image(msg, use_cv_bridge=False)


def test_oversize_image_is_refused_before_reading_data() -> None:
    msg = Image(height=5000, width=5000, encoding="rgb8", step=15000, data=b"")
    with pytest.raises(CodecError, match="5000x5000 = 25000000 pixels, over the limit of 16777216"):
        decode_image(msg, use_cv_bridge=False)
    with pytest.raises(CodecError, match="over the limit of 59"):
        decode_image(image_msg(RGB, "rgb8"), max_pixels=59, use_cv_bridge=False)


def test_the_oversize_error_names_the_settings_that_raise_the_limit() -> None:
    """The node's parameter and the bag tool's option, as they are really spelt (it once named neither)."""
    from unet_perception.node_params import PARAMS
    from unet_perception.tools.bag_cli import build_parser

    with pytest.raises(CodecError) as err:
        decode_image(image_msg(RGB, "rgb8"), max_pixels=59, use_cv_bridge=False)
    assert "max_image_pixels" in str(err.value) and "--max-pixels" in str(err.value)
    assert "max_image_pixels" in {spec.name for spec in PARAMS}
    assert build_parser().parse_args(["label", "in", "out", "--max-pixels", "5"]).max_pixels == 5


# -- compressed images -------------------------------------------------------------------------
SCENE = cv2.GaussianBlur(RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8), (9, 9), 3)


@pytest.mark.parametrize("fmt", ["png", "rgb8; png compressed rgb8", "bgr8; png compressed bgr8"])
def test_png_decodes_exactly(fmt: str) -> None:
    out = decode_compressed(compressed_msg(SCENE, ".png", fmt))
    np.testing.assert_array_equal(out, SCENE)


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8"])
def test_jpeg_decodes_to_rgb(fmt: str) -> None:
    out = decode_compressed(compressed_msg(SCENE, ".jpg", fmt))
    assert out.shape == SCENE.shape and out.dtype == np.uint8
    # lossy, but a channel swap would be off by far more than JPEG's error
    assert np.abs(out.astype(int) - SCENE).mean() < 4


def test_grey_png_decodes_to_three_channels() -> None:
    _, buf = cv2.imencode(".png", SCENE[:, :, 1])
    out = decode_compressed(CompressedImage(format="mono8; png compressed mono8", data=buf.tobytes()))
    np.testing.assert_array_equal(out, np.dstack([SCENE[:, :, 1]] * 3))


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_oversize_compressed_is_refused(ext: str) -> None:
    msg = compressed_msg(SCENE, ext, ext[1:])
    with pytest.raises(CodecError, match="64x48 = 3072 pixels, over the limit of 3000"):
        decode_compressed(msg, max_pixels=3000)
    assert decode_compressed(msg, max_pixels=3072).shape == (48, 64, 3)


@pytest.mark.parametrize("data, match", [
    (b"", "has no data"),
    (b"\xff\xd8\xff\xe0 definitely not a jpeg", "not a decodable JPEG"),
    (bytes(range(200)), "holds an unknown format, not JPEG or PNG"),
])
def test_bad_compressed_data_raises_codec_error(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_compressed(CompressedImage(format="jpeg", data=data))


def test_truncated_png_raises_codec_error() -> None:
    data = compressed_msg(SCENE, ".png", "png").data
    with pytest.raises(CodecError, match="PNG ends before its IEND chunk"):
        decode_compressed(CompressedImage(format="png", data=data[: len(data) // 2]))


def test_compressed_depth_is_refused() -> None:
    msg = compressed_msg(SCENE, ".png", "16UC1; compressedDepth png")
    with pytest.raises(CodecError, match="is a depth image"):
        decode_compressed(msg)


# -- hostile compressed input (test/hostile.py: one payload per class of attack) --------------------
LIMIT = 640 * 480


@pytest.mark.parametrize("name", list(hostile.CLASSES))
def test_hostile_payload_is_refused(name: str) -> None:
    build, fmt, phrase = hostile.CLASSES[name]
    with pytest.raises(CodecError, match=phrase):
        decode(CompressedImage(format=fmt, data=build()), max_pixels=LIMIT)


@pytest.mark.parametrize("name", ["webp as jpeg", "tiff as png", "hidden-size jpeg", "truncated jpeg",
                                  "bit-flipped jpeg"])
def test_opencv_alone_would_have_decoded_it(name: str) -> None:
    """Why the strict path exists: OpenCV decodes these by content, or despite libjpeg's warnings."""
    data = hostile.CLASSES[name][0]()
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None


@pytest.mark.parametrize("name", ["ppm bomb", "bmp bomb", "hidden-size jpeg", "webp as jpeg", "tiff as png"])
def test_refused_before_any_decoder_runs(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong formats and oversize headers never reach a decoder (which would allocate the claimed size)."""
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decoder ran")

    monkeypatch.setattr(codec.cv2, "imdecode", never)
    monkeypatch.setattr(codec.simplejpeg, "decode_jpeg", never)
    build, fmt, phrase = hostile.CLASSES[name]
    msg = CompressedImage(format=fmt, data=build())
    for call in (check, decode):
        with pytest.raises(CodecError, match=phrase):
            call(msg, LIMIT)


def test_format_string_does_not_decide() -> None:
    """A real PNG sent as "jpeg" decodes as the PNG it is; the magic bytes decide."""
    np.testing.assert_array_equal(decode(compressed_msg(SCENE, ".png", "jpeg")), SCENE)


def test_too_many_jpeg_scans_are_refused() -> None:
    data = compressed_msg(SCENE, ".jpg", "jpeg").data
    with pytest.raises(CodecError, match=f"scans, over the limit of {codec.MAX_JPEG_SCANS}"):
        check(CompressedImage(format="jpeg", data=bytes(data) + b"\xff\xda" * (codec.MAX_JPEG_SCANS + 1)))


def test_progressive_jpeg_decodes() -> None:
    data = hostile.encode(SCENE, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    assert decode(CompressedImage(format="jpeg", data=data)).shape == SCENE.shape


def test_png_without_ihdr_is_refused() -> None:
    with pytest.raises(CodecError, match="valid IHDR"):
        check(CompressedImage(format="png", data=b"\x89PNG\r\n\x1a\n" + bytes(40)))


def test_decode_takes_rosbags_messages_too() -> None:
    from rosbags.typesys import Stores, get_typestore

    types = get_typestore(Stores.ROS2_JAZZY).types
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=0, nanosec=0),
                                         frame_id="c")
    png = np.frombuffer(compressed_msg(SCENE, ".png", "png").data, np.uint8)
    comp = types["sensor_msgs/msg/CompressedImage"](header=header, format="png", data=png)
    raw = types["sensor_msgs/msg/Image"](header=header, height=6, width=10, encoding="rgb8", is_bigendian=0,
                                         step=30, data=RGB.reshape(-1))
    np.testing.assert_array_equal(decode(comp), SCENE)
    np.testing.assert_array_equal(decode(raw), RGB)
    assert (source_encoding(comp), source_encoding(raw)) == ("png", "rgb8")


def test_decode_turns_any_decoder_failure_into_codec_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise cv2.error("OpenCV(5.0) imdecode: out of memory")

    monkeypatch.setattr(codec.cv2, "imdecode", crash)
    with pytest.raises(CodecError, match="error: OpenCV.*out of memory"):
        decode(compressed_msg(SCENE, ".png", "png"))


# -- encoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding, pixels", [("rgb8", RGB), ("bgr8", RGB), ("mono8", RGB[:, :, 0])])
def test_encode_fills_every_field(encoding: str, pixels: np.ndarray) -> None:
    header = Header(frame_id="cam")
    header.stamp.sec, header.stamp.nanosec = 12, 34
    msg = encode_image(pixels, encoding, header)
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (6, 10, encoding, 0)
    assert msg.step == 10 * (1 if encoding == "mono8" else 3)
    assert msg.header.frame_id == "cam" and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 34)
    assert isinstance(msg.data, array.array) and msg.data.tobytes() == pixels.tobytes()


def test_encode_then_decode_round_trips_a_non_contiguous_view() -> None:
    view = RGB[:, ::2]
    back = decode_image(encode_image(view, "bgr8", Header()), use_cv_bridge=False)
    np.testing.assert_array_equal(back, view[:, :, ::-1])


@pytest.mark.parametrize("pixels, encoding, match", [
    (RGB, "rgba8", "cannot encode 'rgba8'; encode_image writes mono8, rgb8, bgr8"),
    (RGB, "mono8", r"'mono8' needs a uint8 \[H, W\] array, got uint8 \[6, 10, 3\]"),
    (RGB[:, :, 0], "rgb8", r"needs a uint8 \[H, W, 3\] array"),
    (RGB.astype(np.float32), "rgb8", "got float32"),
])
def test_encode_rejects_mismatched_arrays(pixels: np.ndarray, encoding: str, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode_image(pixels, encoding, Header())


@pytest.mark.parametrize("encoding, expected", [
    ("bgr8", "bgr8"), ("bgra8", "bgr8"), ("bgr16", "bgr8"), ("rgb8", "rgb8"), ("rgba8", "rgb8"),
    ("mono8", "rgb8"), ("yuv422", "rgb8"), ("bgr8; jpeg compressed bgr8", "bgr8"),
    ("rgb8; jpeg compressed bgr8", "rgb8"), ("jpeg", "rgb8"), ("png", "rgb8"),
])
def test_overlay_encoding_follows_the_input_family(encoding: str, expected: str) -> None:
    assert overlay_encoding(encoding) == expected


# -- cv_bridge parity (only where a ROS install provides it) -------------------------------------
@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "rgb16",
                                      "bgr16", "yuv422", "bayer_rggb8"])
def test_numpy_path_matches_cv_bridge(encoding: str) -> None:
    pytest.importorskip("cv_bridge", reason="cv_bridge comes with a ROS install, not with the PyPI wheels")
    channels, dtype, _ = codec._ENCODINGS[encoding]
    pixels = RNG.integers(0, np.iinfo(dtype).max + 1, (6, 10, channels), dtype=np.dtype(dtype))
    msg = image_msg(pixels.reshape(6, -1) if channels < 3 else pixels, encoding, pad=4)
    msg.width = 10
    ours = decode_image(msg, use_cv_bridge=False)
    theirs = decode_image(msg, use_cv_bridge=True)
    # 16-bit: we keep the high byte, cv_bridge scales by 255/65535; they differ by at most 1
    np.testing.assert_allclose(ours.astype(int), theirs.astype(int), atol=1 if dtype == "u2" else 0)
