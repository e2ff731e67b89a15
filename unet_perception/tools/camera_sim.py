"""A synthetic camera: publishes frames from an image folder, or generated ones, at a fixed rate.

Library (tests, benchmarks): :func:`synthetic_frame`, :func:`load_frames`, :func:`image_message`,
:func:`compressed_message` and :class:`CameraSim`. Command line::

    python -m unet_perception.tools.camera_sim --topic camera/image_raw --rate 10 --size 640x480
    python -m unet_perception.tools.camera_sim --images ../shared/data/camvid/val --compressed

Camera-sized frames reach other processes only with a large enough Fast DDS shared-memory segment
on the writer: this tool, like any camera driver, needs ``FASTRTPS_DEFAULT_PROFILES_FILE`` set to the
package's ``config/fastdds_large_frames.xml`` (``--fastdds-profile`` does that for you).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from unet_perception.codec import encode_image
from unet_perception.image_files import IMAGE_SUFFIXES, list_image_files, read_rgb

ENCODINGS = ("rgb8", "bgr8", "mono8")
FORMATS = ("jpeg", "png")


def synthetic_frame(width: int, height: int, index: int = 0) -> np.ndarray:
    """A road-like RGB test frame (sky, road, moving boxes) that differs from frame to frame."""
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    sky = np.array([110, 150, 220], np.float32) * (1.0 - 0.5 * y)
    road = np.array([90, 90, 95], np.float32) + 60.0 * x * y
    frame = np.where(y < 0.45, sky, road).astype(np.uint8)
    frame = np.broadcast_to(frame, (height, width, 3)).copy()
    rng = np.random.default_rng(index)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, max(1, width - 8))), int(rng.integers(0, max(1, height - 8)))
        w, h = int(rng.integers(4, max(5, width // 3))), int(rng.integers(4, max(5, height // 3)))
        frame[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3, dtype=np.uint8)
    return frame


def load_frames(folder: str | Path, width: int, height: int, limit: int = 0) -> list[np.ndarray]:
    """RGB frames from the images in ``folder`` (sorted), resized to ``width`` x ``height``."""
    paths = list_image_files(folder)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{folder}'")
    frames = []
    for path in paths:
        try:
            rgb = read_rgb(path)
        except OSError as exc:
            raise ValueError(str(exc)) from exc
        frames.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return frames


def _header(frame_id: str, stamp: Any = None) -> Any:
    from std_msgs.msg import Header

    header = Header(frame_id=frame_id)
    if stamp is not None:
        header.stamp = stamp
    return header


def image_message(rgb: np.ndarray, encoding: str = "rgb8", frame_id: str = "camera", stamp: Any = None) -> Any:
    """RGB frame -> ``sensor_msgs/Image`` in ``encoding`` (rgb8, bgr8 or mono8)."""
    if encoding == "rgb8":
        data = rgb
    elif encoding == "bgr8":
        data = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    elif encoding == "mono8":
        data = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got '{encoding}'")
    return encode_image(data, encoding, _header(frame_id, stamp))


def compressed_message(rgb: np.ndarray, fmt: str = "png", frame_id: str = "camera", stamp: Any = None) -> Any:
    """RGB frame -> ``sensor_msgs/CompressedImage`` (``png`` is lossless, ``jpeg`` is what drivers send)."""
    from sensor_msgs.msg import CompressedImage

    if fmt not in FORMATS:
        raise ValueError(f"compressed format must be one of {FORMATS}, got '{fmt}'")
    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode a {list(rgb.shape)} frame as {fmt}")
    msg = CompressedImage(header=_header(frame_id, stamp), format=f"rgb8; {fmt} compressed bgr8")
    msg.data = buf.tobytes()
    return msg


class CameraSim:
    """Publishes ``frames`` in a loop on ``topic`` of ``node`` (Image, or CompressedImage with ``fmt``)."""

    def __init__(self, node: Any, topic: str, frames: Sequence[np.ndarray], encoding: str = "rgb8",
                 fmt: str = "", frame_id: str = "camera", qos: Any = None) -> None:
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import CompressedImage, Image

        if not frames:
            raise ValueError("CameraSim needs at least one frame")
        self.node, self.frames, self.encoding, self.fmt, self.frame_id = node, frames, encoding, fmt, frame_id
        self.publisher = node.create_publisher(CompressedImage if fmt else Image, topic,
                                               qos or qos_profile_sensor_data)
        self.sent = 0

    def message(self, index: int) -> Any:
        """The message of frame ``index`` (frames repeat), stamped now."""
        rgb = self.frames[index % len(self.frames)]
        stamp = self.node.get_clock().now().to_msg()
        if self.fmt:
            return compressed_message(rgb, self.fmt, self.frame_id, stamp)
        return image_message(rgb, self.encoding, self.frame_id, stamp)

    def publish_next(self) -> Any:
        """Publish the next frame; returns the message."""
        msg = self.message(self.sent)
        self.publisher.publish(msg)
        self.sent += 1
        return msg


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT like 640x480, got '{text}'") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got '{text}'")
    return width, height


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="camera_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--topic", default="image_raw", help="topic to publish (default: image_raw)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second (default: 10)")
    parser.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT (default: 640x480)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="rgb8", help="raw Image encoding")
    parser.add_argument("--compressed", choices=FORMATS, nargs="?", const="jpeg", default="",
                        help="publish sensor_msgs/CompressedImage in this format (default jpeg) instead")
    parser.add_argument("--images", type=Path, help="folder of images to publish (default: generated frames)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many frames (default: never)")
    parser.add_argument("--frame-id", default="camera", help="header frame_id (default: camera)")
    parser.add_argument("--wait-subscribers", type=int, default=0,
                        help="wait until this many subscribers are matched before publishing")
    parser.add_argument("--fastdds-profile", action="store_true",
                        help="use the package's large-frame Fast DDS profile unless one is set")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.fastdds_profile:
        from unet_perception.launch_support import apply_node_env

        apply_node_env(os.environ)
    import rclpy
    from rclpy.executors import ExternalShutdownException

    width, height = args.size
    frames = (load_frames(args.images, width, height) if args.images
              else [synthetic_frame(width, height, i) for i in range(8)])
    rclpy.init()
    node = rclpy.create_node("camera_sim")
    camera = CameraSim(node, args.topic, frames, args.encoding, args.compressed, args.frame_id)
    try:
        while camera.publisher.get_subscription_count() < args.wait_subscribers:
            rclpy.spin_once(node, timeout_sec=0.05)
        period = 1.0 / args.rate
        start = time.monotonic()
        while rclpy.ok() and (not args.count or camera.sent < args.count):
            camera.publish_next()
            # absolute schedule: the rate does not drift with the time publishing takes
            delay = start + camera.sent * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
