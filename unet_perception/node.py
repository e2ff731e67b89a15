"""``segmentation_node``: camera images in; class labels, colour mask and overlay out (see docs/node.md).

rclpy glue only. Subscription callbacks decode and validate a frame and put it into its camera's
keep-latest slot (a frame replaced before it was processed counts as a drop); one worker thread takes
the latest frame of every camera, runs them as one batch through the Segmenter and publishes, so
memory and latency stay bounded whatever the input rate. ``/diagnostics`` reports per camera.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.exceptions import InvalidTopicNameException, ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import KINDS, PRECISIONS, BackendOptions, create_backend
from unet_perception.class_table import ClassTable
from unet_perception.codec import CodecError, decode_compressed, decode_image, encode_image, overlay_encoding
from unet_perception.launch_support import NODE_NAME, apply_node_env, default_model_path
from unet_perception.model_contract import ModelError, read_model_info
from unet_perception.pipeline import Segmenter
from unet_perception.topics import is_compressed_topic, output_topics

RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT, "reliable": ReliabilityPolicy.RELIABLE}
LATENCY_WINDOW = 200          # latency mean / p99 over the last this many frames of a camera
LOG_THROTTLE_S = 5.0          # at most one bad-input / backend-failure line per call site this often


class StartupError(RuntimeError):
    """A parameter, model or backend problem that stops start-up; the message names what to fix."""


class BuildOnlyDone(Exception):  # noqa: N818 (not an error: the build_only run finished)
    """Raised by the node when ``build_only`` has built the engine; ``main()`` exits 0."""


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: default, description and the constraints checked at start-up."""

    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    int_range: tuple[int, int] | None = None
    float_range: tuple[float, float] | None = None
    read_only: bool = True

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, description=self.description, read_only=self.read_only)
        if self.choices:
            d.additional_constraints = "one of: " + ", ".join(self.choices)
        if self.int_range:
            d.integer_range = [IntegerRange(from_value=self.int_range[0], to_value=self.int_range[1], step=1)]
        if self.float_range:
            d.floating_point_range = [FloatingPointRange(from_value=self.float_range[0],
                                                         to_value=self.float_range[1], step=0.0)]
        return d


PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("image_topics", ["image_raw"], "Camera topics; one ending in /compressed is a "
              "sensor_msgs/CompressedImage. Outputs go to <ns>/segmentation/{labels,color,overlay}."),
    ParamSpec("model_path", "", "ONNX model following the unet_perception contract; empty = the package's "
              "models/unet_camvid.onnx."),
    ParamSpec("backend", "auto", "Inference backend; auto = TensorRT on a GPU with TensorRT, else ONNX Runtime.",
              choices=KINDS),
    ParamSpec("device", "cpu", "onnxruntime: cpu | cuda | tensorrt (execution provider); torch: cpu | cuda."),
    ParamSpec("max_batch", 4, "At most this many camera frames run as one batch.", int_range=(1, 64)),
    ParamSpec("threads", 0, "CPU threads of ONNX Runtime / torch; 0 = the library's default.",
              int_range=(0, 256)),
    ParamSpec("precision", "fp16", "TensorRT precision.", choices=PRECISIONS),
    ParamSpec("engine_cache_dir", "", "TensorRT engine and timing cache folder; empty = the backend's default."),
    ParamSpec("workspace_mb", 1024, "TensorRT builder workspace in MiB.", int_range=(16, 1 << 20)),
    ParamSpec("gpu_id", 0, "CUDA device index.", int_range=(0, 63)),
    ParamSpec("calibration_data", "", "TensorRT int8: folder of camera frames for the entropy calibrator."),
    ParamSpec("qos_reliability", "best_effort", "Reliability of image subscriptions and publishers; "
              "best_effort is the sensor-data QoS camera drivers use.", choices=tuple(RELIABILITY)),
    ParamSpec("qos_depth", 5, "History depth (keep last) of image subscriptions and publishers.",
              int_range=(1, 100)),
    ParamSpec("publish_labels", True, "Publish <ns>/segmentation/labels (mono8 class ids)."),
    ParamSpec("publish_color", True, "Publish <ns>/segmentation/color (rgb8 colour mask)."),
    ParamSpec("publish_overlay", True, "Publish <ns>/segmentation/overlay (input blended with the mask)."),
    ParamSpec("overlay_alpha", 0.5, "Weight of the colour mask in the overlay; changeable at run time.",
              float_range=(0.0, 1.0), read_only=False),
    ParamSpec("max_image_pixels", 4096 * 4096, "Frames with more pixels are refused as bad input.",
              int_range=(1, 1 << 30)),
    ParamSpec("build_only", False, "Build (or find in engine_cache_dir) the TensorRT engine for the model and "
              "exit, without subscribing: for container image builds and CI on a GPU machine."),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.05, 60.0)),
    ParamSpec("class_colors", Parameter.Type.STRING_ARRAY, "Colour overrides, 'Class=R,G,B' with a class "
              "name of the model (class names and ids always come from the model)."),
)


def parse_class_colors(entries: list[str], classes: ClassTable) -> ClassTable:
    """``["Road=128,64,128", ...]`` applied to ``classes``; StartupError naming the bad entry."""
    colors: dict[str, tuple[int, int, int]] = {}
    for entry in entries:
        name, sep, rgb = entry.partition("=")
        parts = rgb.split(",")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
        if not sep or len(values) != 3 or not all(0 <= v <= 255 for v in values):
            raise StartupError(f"class_colors entry '{entry}' is not 'Class=R,G,B' with R, G, B in 0..255 "
                               "(e.g. 'Road=128,64,128')")
        colors[name.strip()] = values  # type: ignore[assignment]
    try:
        return classes.with_colors(colors)
    except ValueError as exc:
        raise StartupError(f"class_colors: {exc}") from exc


@dataclass
class Frame:
    """A decoded input frame waiting in its camera's slot."""

    rgb: np.ndarray
    header: Header
    encoding: str
    received: float  # time.monotonic() when the callback got it


@dataclass
class CameraStats:
    """Counters of one camera; guarded by the node's lock."""

    frames_in: int = 0
    decoded: int = 0  # frames_in that passed decoding and validation
    frames_out: int = 0
    drops: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # the counters at the previous diagnostics message, for rates and "recent" levels
    prev: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)


@dataclass
class Camera:
    """One input topic, its publishers (None when switched off) and its keep-latest slot."""

    topic: str
    publishers: dict[str, Any]
    stats: CameraStats = field(default_factory=CameraStats)
    pending: Frame | None = None


class SegmentationNode(Node):
    """Semantic segmentation of one or more cameras with a U-Net (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._lock = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._segmenter: Segmenter | None = None
        p = self._declare_parameters()
        topics = self._validate(p)
        model_path = p["model_path"] or str(default_model_path())
        try:
            info = read_model_info(model_path)
        except ModelError as exc:
            raise StartupError(f"model_path: {exc}; set model_path to an ONNX file exported with unet-export") \
                from exc
        classes = parse_class_colors(p["class_colors"], info.classes)
        options = BackendOptions(max_batch=p["max_batch"], threads=p["threads"], device=p["device"],
                                 precision=p["precision"], engine_cache_dir=p["engine_cache_dir"],
                                 workspace_mb=p["workspace_mb"], gpu_id=p["gpu_id"],
                                 calibration_data=p["calibration_data"])
        if p["build_only"]:
            self._build_engine_and_stop(info.path, options)
        try:
            backend = create_backend(p["backend"], info, options, log=self.get_logger().info)
            backend.activate()
            backend.infer(np.zeros((1, *info.input_hw, 3), np.uint8))  # warm-up: the first frame is not slow
        except (BackendError, ImportError, RuntimeError) as exc:
            raise StartupError(f"backend '{p['backend']}' (device '{p['device']}') cannot run the model "
                               f"'{model_path}': {exc}") from exc
        self._segmenter = Segmenter(backend, classes)
        self._max_batch = p["max_batch"]
        self._max_pixels = p["max_image_pixels"]
        self._alpha = p["overlay_alpha"]
        self.add_post_set_parameters_callback(self._on_parameters_set)
        self._model = model_path
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=p["qos_depth"],
                         reliability=RELIABILITY[p["qos_reliability"]], durability=DurabilityPolicy.VOLATILE)
        try:
            self._cameras = [self._add_camera(t, qos, p) for t in topics]
        except (InvalidTopicNameException, ValueError) as exc:
            backend.close()
            raise StartupError(f"parameter 'image_topics' is {topics}: {exc}") from exc
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_period = p["diagnostics_period"]
        self._last_diag = time.monotonic()
        self.create_timer(self._diag_period, self._publish_diagnostics)
        self._worker = threading.Thread(target=self._work, name="segmentation_worker", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"segmenting {', '.join(c.topic for c in self._cameras)} with {backend.name} on {backend.device}, "
            f"model '{model_path}' ({info.classes.num_classes} classes, input {info.input_hw[1]}x"
            f"{info.input_hw[0]}), max_batch {self._max_batch}, QoS {p['qos_reliability']} depth {p['qos_depth']}")

    # -- start-up -----------------------------------------------------------------------------
    def _build_engine_and_stop(self, model: Path, options: BackendOptions) -> None:
        try:
            from unet_perception.backends.tensorrt_build import build_only
            engine = build_only(model, options, log=self.get_logger().info)
        except Exception as exc:  # no TensorRT, no GPU, parse or build failure: all stop start-up
            raise StartupError(f"build_only: cannot build a TensorRT engine for '{model}': {exc}") from exc
        raise BuildOnlyDone(str(engine))

    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMS:
            try:
                param = self.declare_parameter(spec.name, spec.default, spec.descriptor())
            except ParameterException as exc:  # wrong type or out of its range; args[0] is the reason
                raise StartupError(f"parameter '{spec.name}' rejected: {exc.args[0]}") from exc
            values[spec.name] = [] if param.type_ == Parameter.Type.NOT_SET else param.value
        return values

    @staticmethod
    def _validate(p: dict[str, Any]) -> list[str]:
        """Checks the descriptors cannot express; returns the input topics."""
        for spec in PARAMS:
            if spec.choices and p[spec.name] not in spec.choices:
                raise StartupError(f"parameter '{spec.name}' is '{p[spec.name]}'; it must be one of "
                                   f"{', '.join(spec.choices)}")
        topics = list(p["image_topics"])
        if not topics or any(not t.strip("/") for t in topics):
            raise StartupError(f"parameter 'image_topics' is {topics}; give one or more topic names, "
                               "e.g. ['camera/image_raw']")
        if len(set(topics)) != len(topics):
            raise StartupError(f"parameter 'image_topics' lists a topic twice: {topics}")
        if not (p["publish_labels"] or p["publish_color"] or p["publish_overlay"]):
            raise StartupError("publish_labels, publish_color and publish_overlay are all false; "
                               "switch at least one output on")
        return topics

    def _add_camera(self, topic: str, qos: QoSProfile, p: dict[str, Any]) -> Camera:
        names = output_topics(topic)
        publishers = {kind: self.create_publisher(Image, names[kind], qos) if p[f"publish_{kind}"] else None
                      for kind in names}
        compressed = is_compressed_topic(topic)
        cam = Camera(topic, publishers)
        decode: Callable[[Any], np.ndarray]
        if compressed:
            decode = lambda msg: decode_compressed(msg, self._max_pixels)  # noqa: E731
        else:
            decode = lambda msg: decode_image(msg, self._max_pixels)  # noqa: E731
        sub = self.create_subscription(CompressedImage if compressed else Image, topic,
                                       lambda msg: self._on_image(cam, msg, decode), qos)
        cam.topic = sub.topic_name  # fully resolved, as users see it in `ros2 topic list`
        return cam

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        for param in params:
            if param.name == "overlay_alpha":
                self._alpha = float(param.value)

    # -- callbacks: decode and store only --------------------------------------------------------
    def _on_image(self, cam: Camera, msg: Image | CompressedImage, decode: Callable[[Any], np.ndarray]) -> None:
        received = time.monotonic()
        try:
            rgb = decode(msg)
        except CodecError as exc:
            self._record_error(cam, f"bad input on {cam.topic}: {exc}")
            with self._lock:
                cam.stats.frames_in += 1
            return
        encoding = msg.format if isinstance(msg, CompressedImage) else msg.encoding
        with self._lock:
            cam.stats.frames_in += 1
            cam.stats.decoded += 1
            if cam.pending is not None:
                cam.stats.drops += 1
            cam.pending = Frame(rgb, msg.header, encoding, received)
            self._lock.notify()

    def _record_error(self, cam: Camera, message: str) -> None:
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        with self._lock:
            cam.stats.errors += 1
            cam.stats.last_error = message

    # -- worker: batch, infer, publish -------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or any(c.pending for c in self._cameras))
                if self._stopping:
                    return
                ready = [(c, c.pending) for c in self._cameras if c.pending is not None]
                for c, _ in ready:
                    c.pending = None
            # Frames of any sizes share a batch: preprocess resizes each to the model input.
            for start in range(0, len(ready), self._max_batch):
                self._process(ready[start:start + self._max_batch])  # type: ignore[arg-type]

    def _process(self, batch: list[tuple[Camera, Frame]]) -> None:
        assert self._segmenter is not None
        try:
            labels = self._segmenter.run([frame.rgb for _, frame in batch])
        except Exception as exc:  # one failed batch (backend error, OOM...) must not stop the node
            for cam, _ in batch:
                self._record_error(cam, f"inference failed on {cam.topic}: {type(exc).__name__}: {exc}")
            return
        for (cam, frame), seg in zip(batch, labels):
            self._publish(cam, frame, seg.labels)

    def _publish(self, cam: Camera, frame: Frame, labels: np.ndarray) -> None:
        assert self._segmenter is not None
        wanted = {k: pub for k, pub in cam.publishers.items() if pub is not None and pub.get_subscription_count()}
        enc = overlay_encoding(frame.encoding)
        rendered = self._segmenter.outputs(frame.rgb, labels, color="color" in wanted,
                                           overlay="overlay" in wanted, alpha=self._alpha,
                                           overlay_bgr=enc == "bgr8")
        images = {"labels": (labels, "mono8"), "color": (rendered.color, "rgb8"), "overlay": (rendered.overlay, enc)}
        for kind, pub in wanted.items():
            array, encoding = images[kind]
            assert array is not None  # outputs() computed every wanted image
            pub.publish(encode_image(array, encoding, frame.header))
        with self._lock:
            cam.stats.frames_out += 1
            cam.stats.latencies.append(time.monotonic() - frame.received)

    # -- diagnostics ---------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        assert self._segmenter is not None
        now = time.monotonic()
        dt = max(now - self._last_diag, 1e-6)
        self._last_diag = now
        backend = self._segmenter.backend
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        with self._lock:
            for cam in self._cameras:
                msg.status.append(self._camera_status(cam, dt, backend.name, backend.device))
        self._diag_pub.publish(msg)

    def _camera_status(self, cam: Camera, dt: float, backend: str, device: str) -> DiagnosticStatus:
        s = cam.stats
        counters = (s.frames_in, s.decoded, s.frames_out, s.drops, s.errors)
        d_in, d_decoded, d_out, d_drops, d_errors = (now - before for now, before in zip(counters, s.prev))
        s.prev = counters
        lat_ms = np.asarray(s.latencies, dtype=np.float64) * 1000.0
        if d_decoded and not d_out:  # good frames came in, nothing went out: inference is failing or stuck
            level, text = DiagnosticStatus.ERROR, f"no output for {d_decoded} good frames in the last {dt:.1f} s"
        elif d_errors or d_drops:
            level, text = DiagnosticStatus.WARN, f"{d_errors} errors, {d_drops} drops in the last {dt:.1f} s"
        else:
            level, text = DiagnosticStatus.OK, "ok" if s.frames_out else "waiting for images"
        values = {
            "rate_in_hz": f"{d_in / dt:.2f}", "rate_out_hz": f"{d_out / dt:.2f}",
            "frames_in": str(s.frames_in), "frames_out": str(s.frames_out), "drops": str(s.drops),
            "latency_mean_ms": f"{lat_ms.mean():.2f}" if lat_ms.size else "nan",
            "latency_p99_ms": f"{np.percentile(lat_ms, 99):.2f}" if lat_ms.size else "nan",
            "backend": backend, "device": device, "model": self._model,
            "errors": str(s.errors), "last_error": s.last_error,
        }
        return DiagnosticStatus(level=level, name=f"unet_perception: {cam.topic}",
                                message=text, hardware_id=cam.topic,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    # -- shutdown -------------------------------------------------------------------------------------
    def destroy_node(self) -> None:
        """Stop and join the worker, close the backend, then destroy the node."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self._segmenter is not None:
            self._segmenter.backend.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """``ros2 run unet_perception segmentation_node`` / ``python -m unet_perception.node``."""
    profile = apply_node_env()  # before rclpy.init: Fast DDS reads it when the participant is created
    rclpy.init(args=args)
    node: SegmentationNode | None = None
    try:
        node = SegmentationNode()
        node.get_logger().debug(f"Fast DDS profile: {profile}")
        rclpy.spin(node)
    except StartupError as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(exc))
        return 1
    except BuildOnlyDone as done:
        rclpy.logging.get_logger(NODE_NAME).info(f"build_only: engine ready at {done}")
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
