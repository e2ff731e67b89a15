"""``segmentation_node``: camera images in; labels, confidence, colour mask, overlay and class map out.

rclpy glue only, as a lifecycle node (docs/node.md): configure reads the parameters, loads the model and
the backend; activate creates publishers and subscriptions and starts the worker; deactivate stops them
and keeps the backend; cleanup and shutdown free it. ``autostart`` (default) runs configure and activate
in the constructor, so ``ros2 run`` and ``ros2 launch`` need no lifecycle manager.

Subscriptions are raw: a callback gets a frame's CDR bytes, reads its header and geometry from them
(``raw_cdr``, constant time, nothing copied), checks them (``codec.check``: bounded cost, whatever the message
claims) and puts the frame into its camera's keep-latest slot (a frame replaced before it was processed counts as
a drop). Three stage threads follow (docs/performance.md): *prepare* takes the latest frame of every camera,
decodes it (``codec.decode``, the bag tool's path too) and resizes it into the model's input batch; *infer* runs
the backend; *publish* upscales, renders what is subscribed and publishes CDR written straight from the arrays.
One batch at most waits between two stages, so memory and latency stay bounded whatever the input rate, each
camera's outputs keep the order its frames arrived in, and no camera's frames can stall the executor. With
``overlap: never`` (``auto`` on the CPU) one thread runs the three steps in turn, or ``workers`` threads do, each
on other cameras' frames at the same time (auto: one per camera up to the cores, on the CPU).

The parameter table and its checks live in ``node_params``, the per-camera counters in ``node_stats``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.exceptions import InvalidTopicNameException, ParameterException, ParameterUninitializedException
from rclpy.executors import ExternalShutdownException
from rclpy.lifecycle import LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from unet_perception.backends.base import BackendError, Pending
from unet_perception.backends.factory import BackendOptions, create_backend, usable_cores
from unet_perception.camera_model import CameraInfoError
from unet_perception.codec import check, decode, overlay_encoding, source_encoding
from unet_perception.ground import GroundError
from unet_perception.ground_camera import GroundCamera, GroundSettings, TfSource
from unet_perception.handoff import Handoff
from unet_perception.lifecycle_guard import GuardedLifecycleNode
from unet_perception.launch_support import NODE_NAME, apply_node_env, default_model_path, missing_profile_note
from unet_perception.model_contract import UNKNOWN_LABEL, ModelError, ModelInfo, read_model_info
from unet_perception.node_params import (EMPTY_LISTS, PARAMS, QOS_RELIABILITY, StartupError, parse_class_colors,
                                         validate)
from unet_perception.node_stats import CameraStats, check_stamp, stamp_ns
from unet_perception.pipeline import Segmentation, Segmenter
from unet_perception.receiver import FrameReceiver, TakenByReceiver
from unet_perception.raw_cdr import RawCompressedImage, RawHeader, RawImage, image, parse_compressed, parse_image
from unet_perception.topics import GROUND_GRID, LABEL_INFO, POINTS, camera_outputs, is_compressed_topic, output_kinds

__all__ = ["PARAMS", "SegmentationNode", "StartupError", "main"]  # PARAMS, StartupError: node_params

try:  # vision_msgs: ros-jazzy-vision-msgs on a ROS system, interfaces/vision_msgs in the venv (make venv)
    from vision_msgs.msg import LabelInfo, VisionClass
except ImportError:  # no class map topic then; configure says so once
    LabelInfo = VisionClass = None

RELIABILITY = dict(zip(QOS_RELIABILITY, (ReliabilityPolicy.BEST_EFFORT, ReliabilityPolicy.RELIABLE), strict=True))
LOG_THROTTLE_S = 5.0          # at most one error line per camera and kind of error this often (all are counted)
MAX_ERROR_CHARS = 500         # an error line longer than this is cut (a hostile string may be 4096 characters)
IN_FLIGHT = 3  # overlapped stages: one batch resolving in publish, one waiting for it, one just submitted
AUTO_BATCH_CUDA = 4           # max_batch 0 (auto) on a GPU: batching cameras raises throughput there
SLOW_RATIO = 0.5              # WARN when the output rate is below this share of the input rate
STUCK_S = 2.0                 # ERROR when a frame has been in progress this long (and STUCK_RUNS of its
STUCK_RUNS = 5                # recent inference times) and nothing went out in the period: a hung backend


def overlapped(p: dict[str, Any]) -> bool:
    """Whether the stages run in their own threads: ``overlap`` always, or auto on a GPU (measured in
    docs/performance.md: on the 2-core CPU overlap added a batch of latency and no frames per second)."""
    return p["overlap"] == "always" or (p["overlap"] == "auto" and p["device"] == "cuda")


def batch_limit(p: dict[str, Any]) -> int:
    """``max_batch``, with 0 (auto) = 4 for device cuda, 1 for cpu: on the CPU a batch of N frames takes N inference
    times (ONNX Runtime gains nothing from batching there), so one frame at a time, the cameras taking turns,
    gives the lowest latency at the same throughput (docs/performance.md)."""
    return int(p["max_batch"]) or (AUTO_BATCH_CUDA if p["device"] == "cuda" else 1)


def worker_count(p: dict[str, Any], cameras: int) -> int:
    """``workers`` as set (more than the cameras: several frames of a camera at once, published in order); 0 (auto)
    = one per camera up to the usable cores on device cpu with stages in turn and batches of one frame, else 1: on 2
    shared cores two frames on one thread each spent 9 % fewer core-ms than one frame on two threads
    (docs/performance.md); one camera keeps every thread for its frame, which is the lowest latency."""
    if p["workers"]:
        return int(p["workers"])
    if p["device"] != "cpu" or overlapped(p) or batch_limit(p) > 1:
        return 1
    return max(1, min(cameras, usable_cores()))


def inference_threads(p: dict[str, Any], workers: int) -> int:
    """Threads of each inference: ``threads``, or 0 (the library's default) for one worker, else the usable cores
    shared among the workers (the backend gives each worker a session of its own unless that is one thread: ONNX
    Runtime runs a one-thread session on the calling thread, so the workers share it)."""
    if p["threads"] or workers == 1:
        return int(p["threads"])
    return max(1, usable_cores() // workers)


def _printable(text: str) -> str:
    """An error as logged and kept in last_error: one line, cut to MAX_ERROR_CHARS, control characters shown
    escaped (a sender's encoding, format or frame_id may carry a newline that forges a log line, or an ANSI
    escape that rewrites the terminal)."""
    cut = text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " ..."
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)


@dataclass
class Frame:
    """An input frame waiting in its camera's slot: header-checked by the callback, decoded by the worker."""

    msg: RawImage | RawCompressedImage  # its pixels are a view of the received bytes until decoded
    received: float  # time.monotonic() when the callback got it
    taken: float = 0.0  # when a worker took it from the slot
    seq: int = 0        # its camera's count of frames taken when it was taken (workers > 1: publishing order)
    _rgb: np.ndarray | None = None

    def decode(self, max_pixels: int) -> None:
        """Decode (worker thread); ``codec.CodecError`` for a frame that does not decode cleanly."""
        self._rgb = decode(self.msg, max_pixels)

    @property
    def rgb(self) -> np.ndarray:
        assert self._rgb is not None, "the worker decodes a frame before it is processed"
        return self._rgb

    @property
    def header(self) -> RawHeader:
        return self.msg.header

    def ros_header(self) -> Header:
        """The header as a std_msgs message, for the outputs rclpy serialises (points, ground_grid)."""
        h = self.msg.header
        return Header(stamp=Time(sec=h.stamp.sec, nanosec=h.stamp.nanosec), frame_id=h.frame_id)

    @property
    def encoding(self) -> str:
        return source_encoding(self.msg)


@dataclass
class Camera:
    """One input topic, its publishers (None when switched off or not available) and its keep-latest slot."""

    topic: str
    publishers: dict[str, Any]
    stats: CameraStats = field(default_factory=CameraStats)
    pending: Frame | None = None
    in_progress: dict[int, float] = field(default_factory=dict)  # id(frame) -> taken, until published or failed
    # workers > 1: its publishing order (the counts are kept only then)
    taken: int = 0          # frames taken so far: the next one gets seq taken + 1
    finished: int = 0       # frames 1..finished are published or failed; frame seq publishes once finished is seq - 1
    done_early: set[int] = field(default_factory=set)  # finished while an earlier one was still in progress
    turns: int = 0          # times served (frames taken); one turn behind the most served at least, once served
    subscription: Any = None
    ground: GroundCamera | None = None  # ground.enabled: camera_info in, points and ground_grid out
    parse: Any = parse_image  # raw_cdr.parse_image or parse_compressed, by the topic's type


@dataclass
class Work:
    """One backend batch on its way through the stages: its frames, then the input batch, then the prediction."""

    items: list[tuple[Camera, Frame]]
    inputs: np.ndarray
    pending: Pending | None = None  # submitted to the backend (the infer stage); collected by the publish stage
    inference_s: float = 0.0        # in submit plus waiting for the result, s (CPU: the run; GPU: at least the run)


@dataclass(frozen=True)
class Config:
    """What configure read and checked: the parameters and the resolved input topics with their outputs."""

    params: dict[str, Any]
    inputs: dict[str, str]  # resolved input topic -> output prefix (<ns>/segmentation)
    info: ModelInfo
    ground: GroundSettings | None = None  # None unless ground.enabled
    workers: int = 1  # frames processed at the same time (worker_count)


class SegmentationNode(GuardedLifecycleNode):
    """Semantic segmentation of one or more cameras with a U-Net (see the module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._lock = threading.Condition()
        self._stopping = False
        self._workers: list[threading.Thread] = []  # prepare (or the whole step in turn), one per worker
        self._stages: list[threading.Thread] = []   # overlap: infer, then publish
        self._per_camera = 0  # workers > 1: frames of one camera processed at once (0: one worker, no limit)
        self._receiver: FrameReceiver | None = None  # input_thread: takes the camera frames
        self._to_infer: Handoff[Work] = Handoff()
        self._to_publish: Handoff[Work] = Handoff()
        self._segmenter: Segmenter | None = None
        self._config: Config | None = None
        self._cameras: list[Camera] = []
        self._label_info_pubs: list[Any] = []
        self._diag_pub: Any = None
        self._diag_timer: Any = None
        self._tf: TfSource | None = None
        self._failure: StartupError | None = None  # why the last configure failed
        self._logged: dict[tuple[str, str], float] = {}  # (camera, kind of error) -> when its last line went out
        self._autostarting = False
        p = self._declare_parameters()
        self._alpha = p["overlay_alpha"]
        self.add_post_set_parameters_callback(self._on_parameters_set)
        if p["autostart"]:
            try:
                self._autostart()
            except BaseException:
                # the caller never gets this half-built node to destroy: do it here, before the context goes,
                # rather than leave its rcl and DDS entities to garbage collection at interpreter exit
                self._destroy_after_failed_start()
                raise

    def _destroy_after_failed_start(self) -> None:
        """destroy_node, run again when a Ctrl-C interrupts it (ros2 launch sends its own after the terminal's;
        each step skips what is already gone), a few times at most; no failure here may hide why start-up failed,
        which the caller raises next. (Signals are not held off instead: where rclpy installed its own handlers,
        Python cannot put them back.)"""
        for _ in range(5):
            try:
                self.destroy_node()
                return
            except KeyboardInterrupt:
                continue
            except BaseException as exc:  # noqa: BLE001
                self.get_logger().debug(f"clean-up after the failed start: {type(exc).__name__}: {exc}")
                return

    def _autostart(self) -> None:
        """configure + activate now; a failure raises the StartupError that main() turns into one FATAL line."""
        self._autostarting = True
        try:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise self._failure or StartupError("configure failed")
            if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                raise self._failure or StartupError("activate failed")
        finally:
            self._autostarting = False

    # -- lifecycle transitions --------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Read and check the parameters, load the model, create and warm up the backend."""
        self._failure = None
        try:
            self._configure()
        except Exception as exc:  # noqa: BLE001 - rclpy would swallow it; say why instead
            self._release()
            return self._fail(exc)
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Publishers, subscriptions, the class map, diagnostics and the worker go live."""
        try:
            self._activate()
        except Exception as exc:  # noqa: BLE001 - as in on_configure
            self._deactivate()
            return self._fail(exc)
        return TransitionCallbackReturn.SUCCESS

    def _fail(self, exc: Exception) -> TransitionCallbackReturn:
        """Keep why a transition failed (autostart raises it); under a lifecycle manager log it as FATAL."""
        self._failure = exc if isinstance(exc, StartupError) else \
            StartupError(f"{type(exc).__name__}: {exc}")
        if not self._autostarting:  # nobody else reports it
            self.get_logger().fatal(str(self._failure))
        return TransitionCallbackReturn.FAILURE

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the worker and all I/O; the backend (and its engine) stays loaded."""
        self._deactivate()
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Free the backend's memory; back to unconfigured."""
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS

    # -- configure ------------------------------------------------------------------------------
    def _configure(self) -> None:
        p = {spec.name: self._param_value(spec.name) for spec in PARAMS}
        topics = validate(p)
        inputs = self._resolve_inputs(topics)
        model_path = p["model_path"] or str(default_model_path())
        try:
            info = read_model_info(model_path)
        except ModelError as exc:
            raise StartupError(f"model_path: {exc}; set model_path to an ONNX file exported with unet-export") \
                from exc
        if p["unknown_threshold"] and not info.has_confidence:
            raise StartupError(f"unknown_threshold is {p['unknown_threshold']} but model '{model_path}' has no "
                               "confidence output; re-export it with unet-export or set unknown_threshold to 0")
        classes = parse_class_colors(p["class_colors"], info.classes)
        ground = GroundSettings.from_params(p, list(info.classes.names)) if p["ground.enabled"] else None
        workers = worker_count(p, len(inputs))
        options = BackendOptions(max_batch=batch_limit(p), threads=inference_threads(p, workers), device=p["device"],
                                 concurrent=workers,
                                 precision=p["precision"], engine_cache_dir=p["engine_cache_dir"],
                                 workspace_mb=p["workspace_mb"], gpu_id=p["gpu_id"], checkpoint=p["checkpoint"],
                                 in_flight=IN_FLIGHT if overlapped(p) else 1, spinning=p["spinning"],
                                 spin_us=p["spin_us"])
        backend = None
        try:
            backend = create_backend(p["backend"], info, options, log=self.get_logger().info)
            backend.activate()
            for _ in range(workers):  # warm-up, each session once (their queue is first in, first out)
                backend.infer(np.zeros((1, *info.input_hw, 3), np.uint8))  # the first frame is not slow
        except Exception as exc:
            if backend is not None:  # a manager may retry configure: free what activate allocated (GPU memory) now
                backend.close()
            if isinstance(exc, (BackendError, ImportError, RuntimeError)):
                raise StartupError(f"backend '{p['backend']}' (device '{p['device']}') cannot run the model "
                                   f"'{model_path}': {exc}") from exc
            raise
        self._segmenter = Segmenter(backend, classes, p["unknown_threshold"])
        self._max_pixels = p["max_image_pixels"]
        self._model = model_path
        self._config = Config(p, inputs, info, ground, workers)
        if LabelInfo is None:
            self.get_logger().warning("vision_msgs is not installed: no <ns>/segmentation/label_info (class map) "
                                      "topic; install ros-jazzy-vision-msgs (or run make venv)")

    def get_parameter(self, name: str) -> Parameter:
        """rclpy's, except that a list parameter declared without a value (``class_colors``, ``ground.free_classes``,
        ``ground.obstacle_classes``: rclpy reads an empty default list as a byte array, so they are declared typed
        and unset) is the empty string array it means. rclpy's parameter service asks this method, and one unset
        parameter in a request emptied the whole answer: a client reading every parameter at once (``ros2 param
        dump``) got none."""
        try:
            return super().get_parameter(name)
        except ParameterUninitializedException:
            if name not in EMPTY_LISTS:
                raise
            return Parameter(name, Parameter.Type.STRING_ARRAY, [])

    def get_parameter_type(self, name: str) -> Parameter.Type:
        """rclpy's, except that an unset list parameter is the empty string array it means, as in get_parameter
        (what ``ros2 param get-types`` shows)."""
        if name in EMPTY_LISTS:
            # as rclpy's own: the type's number (what the service sends), though annotated as the enum
            return cast(Parameter.Type, self.get_parameter(name).type_.value)
        return super().get_parameter_type(name)

    def _param_value(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _resolve_inputs(self, topics: list[str]) -> dict[str, str]:
        """Input topics as rclpy resolves them (namespace, ``~``, ``-r`` remapping) -> their output prefixes."""
        resolved = []
        for topic in topics:
            try:
                resolved.append(self.resolve_topic_name(topic))
            except (InvalidTopicNameException, RuntimeError) as exc:  # rclpy raises RCLError (a RuntimeError)
                reason = str(exc).split(", at ")[0]  # drop rcl's source location
                raise StartupError(f"parameter 'image_topics' is {topics}: '{topic}': {reason}") from exc
        try:
            inputs = camera_outputs(resolved)
        except ValueError as exc:
            raise StartupError(f"parameter 'image_topics' is {topics}: {exc}") from exc
        if len(inputs) < len(resolved):
            self.get_logger().info(f"image_topics {topics} resolve to {list(inputs)}; each is subscribed once")
        return inputs

    def _release(self) -> None:
        """Close the backend (frees GPU and CPU memory); the node is unconfigured afterwards."""
        if self._segmenter is not None:
            self._segmenter.backend.close()
        self._segmenter = None
        self._config = None

    # -- activate / deactivate --------------------------------------------------------------------
    def _activate(self) -> None:
        assert self._config is not None and self._segmenter is not None
        p, info, backend = self._config.params, self._config.info, self._segmenter.backend
        history = {"history": HistoryPolicy.KEEP_LAST, "depth": p["qos_depth"],
                   "durability": DurabilityPolicy.VOLATILE}
        qos_in = QoSProfile(reliability=RELIABILITY[p["input_qos"]], **history)
        qos_out = QoSProfile(reliability=RELIABILITY[p["output_qos"]], **history)
        ground = self._config.ground
        if ground is not None and ground.source == "tf":
            self._tf = TfSource(self, ground.base_frame)
        self._cameras = []
        try:
            for topic, prefix in self._config.inputs.items():
                self._add_camera(topic, prefix, qos_in, qos_out, p)
        except (InvalidTopicNameException, ValueError) as exc:
            raise StartupError(f"parameter 'image_topics' is {list(self._config.inputs)}: {exc}") from exc
        if p["input_thread"]:
            cams = self._cameras
            self._receiver = FrameReceiver(
                self.context, [c.subscription for c in cams], [partial(self._on_image, c) for c in cams],
                lambda i, reason: self._record_error(cams[i], f"receiving failed on {cams[i].topic}: {reason}"))
            self._receiver.start()
        self._publish_label_info(info)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._last_diag = time.monotonic()
        self._diag_timer = self.create_timer(p["diagnostics_period"], self._publish_diagnostics)
        with self._lock:
            self._stopping = False
        self._to_infer, self._to_publish = Handoff(), Handoff()
        workers = self._config.workers
        # More workers than cameras process several frames of a camera at once, published in the order taken.
        self._per_camera = -(-workers // len(self._cameras)) if workers > 1 else 0
        if workers > len(self._cameras):
            self.get_logger().info(f"workers {workers} for {len(self._cameras)} camera(s): up to {self._per_camera} "
                                   "frames of a camera at once, published in the order they arrived")
        self._workers = [threading.Thread(target=self._work, daemon=True,
                                          name="segmentation_prepare" if workers == 1 else f"segmentation_worker_{i}")
                         for i in range(workers)]
        self._stages = [threading.Thread(target=target, name=name, daemon=True) for target, name in
                        ((self._infer_loop, "segmentation_infer"), (self._publish_loop, "segmentation_publish"))
                        ] if overlapped(p) else []
        for thread in self._workers + self._stages:
            thread.start()
        kinds = [k for k, pub in self._cameras[0].publishers.items() if pub is not None]
        kinds += [LABEL_INFO] if self._label_info_pubs else []
        kinds += [POINTS, GROUND_GRID] if ground is not None else []
        outputs = ", ".join(f"{prefix}/{{{','.join(kinds)}}}" for prefix in self._config.inputs.values())
        self.get_logger().info(
            f"segmenting {', '.join(c.topic for c in self._cameras)} with {backend.name} on {backend.device}, "
            f"model '{self._model}' ({info.classes.num_classes} classes, input {info.input_hw[1]}x"
            f"{info.input_hw[0]}), max_batch {backend.max_batch}; outputs {outputs}; QoS in {p['input_qos']}, "
            f"out {p['output_qos']}, depth {p['qos_depth']}; stages {'overlapped' if overlapped(p) else 'in turn'}"
            + (f"; {workers} workers, {inference_threads(p, workers)} threads each" if workers > 1 else "")
            + (f"; ground from {ground.source} in {ground.base_frame}" if ground is not None else ""))

    def _deactivate(self) -> None:
        """Stop and join the stages (batches in flight are finished), then remove subscriptions, publishers and
        the diagnostics timer."""
        if self._receiver is not None:  # first: no frame arrives once the stages stop
            self._receiver.stop()
            self._receiver = None
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for worker in self._workers:  # prepare first: nothing new enters while the later stages drain
            worker.join()
        self._to_infer.close()  # overlap: the infer stage drains it, then the publish stage drains its own
        for stage, then_close in zip(self._stages, (self._to_publish, None)):
            stage.join()
            if then_close is not None:
                then_close.close()
        self._workers, self._stages = [], []
        for cam in self._cameras:
            if cam.subscription is not None:
                self.destroy_subscription(cam.subscription)
            for pub in cam.publishers.values():
                if pub is not None:
                    self.destroy_publisher(pub)
            if cam.ground is not None:
                cam.ground.destroy()
        for pub in self._label_info_pubs:
            self.destroy_publisher(pub)
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        if self._diag_pub is not None:
            self.destroy_publisher(self._diag_pub)
        if self._tf is not None:
            self._tf.close()
            self._tf = None
        self._cameras, self._label_info_pubs, self._diag_timer, self._diag_pub = [], [], None, None

    def _publish_label_info(self, info: ModelInfo) -> None:
        """The class map on each camera's ``<ns>/segmentation/label_info``, transient local (late joiners get it)."""
        if LabelInfo is None:
            return
        assert self._config is not None and self._segmenter is not None
        threshold = self._segmenter.unknown_threshold
        class_map = [VisionClass(class_id=i, class_name=name) for i, name in enumerate(info.classes.names)]
        if threshold:
            class_map.append(VisionClass(class_id=UNKNOWN_LABEL, class_name="unknown"))
        msg = LabelInfo(class_map=class_map, threshold=threshold / 255.0)
        msg.header.stamp = self.get_clock().now().to_msg()
        qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        for prefix in self._config.inputs.values():
            pub = self.create_publisher(LabelInfo, f"{prefix}/{LABEL_INFO}", qos)
            pub.publish(msg)
            self._label_info_pubs.append(pub)

    # -- start-up -----------------------------------------------------------------------------
    def _declare_parameters(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for spec in PARAMS:
            try:
                self.declare_parameter(spec.name, spec.default, spec.descriptor())
            except ParameterException as exc:  # wrong type or out of its range; args[0] is the reason
                raise StartupError(f"parameter '{spec.name}' rejected: {exc.args[0]}") from exc
            values[spec.name] = self._param_value(spec.name)
        return values

    def _add_camera(self, topic: str, prefix: str, qos_in: QoSProfile, qos_out: QoSProfile,
                    p: dict[str, Any]) -> None:
        """The camera's publishers, subscription and ground projection, in ``self._cameras`` from the start, so
        that a failure half way leaves nothing that ``_deactivate`` does not destroy."""
        assert self._config is not None
        compressed = is_compressed_topic(topic)
        cam = Camera(topic, {}, parse=parse_compressed if compressed else parse_image)
        self._cameras.append(cam)
        for kind in output_kinds(self._config.info.has_confidence):
            cam.publishers[kind] = (self.create_publisher(Image, f"{prefix}/{kind}", qos_out)
                                    if p[f"publish_{kind}"] else None)
        # raw: the callback gets the CDR bytes; only the frames the worker takes are ever converted (raw_cdr).
        # input_thread: the FrameReceiver takes them (TakenByReceiver keeps the executor off), else the executor.
        group = TakenByReceiver() if p["input_thread"] else None
        cam.subscription = self.create_subscription(
            CompressedImage if compressed else Image, topic, lambda data: self._on_image(cam, cast(bytes, data)),
            qos_in, raw=True, callback_group=group)
        cam.topic = cam.subscription.topic_name  # fully resolved, as users see it in `ros2 topic list`
        if self._config.ground is not None:
            cam.ground = GroundCamera(self, cam.topic, prefix, self._config.ground, qos_in, qos_out,
                                      self._tf.ground if self._tf else None, lambda m: self._record_error(cam, m))

    def _on_parameters_set(self, params: list[Parameter]) -> None:
        for param in params:
            if param.name == "overlay_alpha":
                self._alpha = float(param.value)

    # -- callbacks: check and store only (decoding runs in the worker) ------------------------------
    def _on_image(self, cam: Camera, data: bytes) -> None:
        received = time.monotonic()
        try:
            msg = cam.parse(data)  # header and geometry; the pixels stay a view of ``data``
        except Exception as exc:  # noqa: BLE001 - bytes that are not the message they claim: bad input
            with self._lock:
                cam.stats.frames_in += 1
            self._record_error(cam, f"bad input on {cam.topic}: {exc}")
            return
        with self._lock:
            cam.stats.frames_in += 1
            cam.stats.stamps.add(stamp_ns(msg.header.stamp))
        try:
            check(msg, self._max_pixels)
            check_stamp(msg.header.stamp)  # nanosec >= 1e9: bad input, as the output would carry it
        except Exception as exc:  # noqa: BLE001 - whatever a hostile message raises is bad input, never a crash
            self._record_error(cam, f"bad input on {cam.topic}: {exc}")
            return
        with self._lock:
            if cam.pending is not None:
                cam.stats.drops += 1
            cam.pending = Frame(msg, received)
            # a worker waiting for its turn to publish (workers above the cameras) must not take the only wake-up
            if self._per_camera > 1:
                self._lock.notify_all()
            else:
                self._lock.notify()

    def _decode(self, cam: Camera, frame: Frame) -> bool:
        """Decode a frame taken from its slot; one that does not decode cleanly is counted bad input."""
        try:
            frame.decode(self._max_pixels)
        except Exception as exc:  # noqa: BLE001 - as in _on_image: counted, never published, never a crash
            self._record_error(cam, f"bad input on {cam.topic}: {exc}")
            self._ended(cam, frame)
            return False
        return True

    def _ended(self, cam: Camera, frame: Frame) -> None:
        """The frame is out of progress: published, failed or bad (what the stuck check of /diagnostics reads)."""
        with self._lock:
            cam.in_progress.pop(id(frame), None)

    def _record_error(self, cam: Camera, message: str, failed: bool = False) -> None:
        """Count and log an error of ``cam``; ``failed``: a good (decoded) frame failed, so it goes out never."""
        if not self.context.ok():  # Ctrl-C / SIGTERM mid-batch: publishing failed because the process is ending
            return
        message = _printable(message)
        # Throttled per camera and kind ("bad input", "inference failed", ...: the text before " on <topic>"),
        # not per call site: one camera's junk must not hide another camera's (or its own other) failures.
        key, now = (cam.topic, message.split(" on ", 1)[0]), time.monotonic()
        with self._lock:
            cam.stats.errors += 1
            cam.stats.failed += failed
            cam.stats.last_error = message
            due = now - self._logged.get(key, -LOG_THROTTLE_S) >= LOG_THROTTLE_S
            if due:
                self._logged[key] = now
        if due:
            self.get_logger().warning(message)

    # -- stages: prepare (decode, resize), infer, publish; in their own threads with overlap ----------------
    def _work(self) -> None:
        """The prepare stage: take the latest frame of every camera that is free, decode, batch; then infer and
        publish in turn (``overlap`` never) or hand the batch on. With workers > 1 several run this at once, each
        camera with at most ``_per_camera`` frames between taking and publishing, published in the order taken."""
        assert self._config is not None
        overlap = overlapped(self._config.params)
        while True:
            if overlap:  # take frames only once the next stage can take the batch: none ages in between
                self._to_infer.wait_free()
            with self._lock:
                self._lock.wait_for(lambda: self._stopping or any(self._free(c) for c in self._cameras))
                if self._stopping:
                    return
                ready = self._take_frames()
            try:
                with self._outlives_any_batch(ready):
                    self._process(ready, overlap)
            finally:
                if self._per_camera:
                    with self._lock:
                        for cam, frame in ready:
                            cam.done_early.add(frame.seq)
                            while cam.finished + 1 in cam.done_early:
                                cam.done_early.remove(cam.finished + 1)
                                cam.finished += 1
                        self._lock.notify_all()

    def _free(self, cam: Camera) -> bool:
        """Whether a worker may take the camera's waiting frame (under the lock)."""
        return cam.pending is not None and (not self._per_camera or len(cam.in_progress) < self._per_camera)

    def _process(self, ready: list[tuple[Camera, Frame]], overlap: bool) -> None:
        assert self._segmenter is not None
        # Frames of any sizes share a batch: prepare resizes each to the model input.
        items = [(c, f) for c, f in ready if self._decode(c, f)]
        if not items:
            return
        try:
            work = Work(items, self._segmenter.prepare([frame.rgb for _, frame in items]))
        except Exception as exc:  # noqa: BLE001 - as in _infer: the worker outlives any one batch
            self._batch_failed(items, "preparing the batch", exc)
            return
        if overlap:
            self._to_infer.put(work)
        elif self._infer(work):
            self._publish_batch(work)

    def _take_frames(self) -> list[tuple[Camera, Frame]]:
        """At most max_batch waiting frames of cameras not busy, one per camera (under the lock). Cameras take
        turns, and within a turn the newest frame goes first: the cameras that wait go by how often they were
        served, and of those served equally often the one whose frame arrived last goes first. A frame that waited
        long is not served in a hurry, as its camera will have a newer one soon, so slots are served while they are
        fresh: the wait in the slot falls at the same frames per camera (docs/performance.md, "Serving order").
        The cameras left out keep their keep-latest slot, so their frame stays the newest until its turn, rather
        than aging in a second batch behind this one."""
        assert self._segmenter is not None
        waiting = [(c, f) for c in self._cameras if self._free(c) and (f := c.pending) is not None]
        waiting.sort(key=lambda item: (item[0].turns, -item[1].received))
        ready = waiting[:self._segmenter.backend.max_batch]
        # a camera that was silent for a while (or never got a frame through) catches up by one turn, not by all
        # it missed: the others would wait while it does
        most = max(c.turns for c in self._cameras)
        now = time.monotonic()
        for c, frame in ready:
            c.pending = None
            c.turns = max(c.turns + 1, most - 1)
            frame.taken = now
            c.in_progress[id(frame)] = now
            if self._per_camera:
                c.taken += 1
                frame.seq = c.taken
        return ready

    def _infer_loop(self) -> None:
        while (work := self._to_infer.get()) is not None:
            with self._outlives_any_batch(work.items):
                if self._infer(work):
                    self._to_publish.put(work)

    def _publish_loop(self) -> None:
        while (work := self._to_publish.get()) is not None:
            with self._outlives_any_batch(work.items):
                self._publish_batch(work)

    @contextmanager
    def _outlives_any_batch(self, items: list[tuple[Camera, Frame]]) -> Iterator[None]:
        """Every stage thread outlives any one batch: the steps report their own failures, and whatever escapes
        them anyway fails the batch's frames that no step has ended (published, failed or bad) yet; the thread
        goes on with the next batch. A dead stage would leave its cameras silent, and deactivation waiting for
        ever on a handoff nobody empties."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - see above
            with self._lock:
                unended = [(c, f) for c, f in items if id(f) in c.in_progress]
            self._batch_failed(unended, "processing", exc)

    def _infer(self, work: Work) -> bool:
        """Submit the batch: the CPU backends compute here, TensorRT on its own stream while the stages go on."""
        assert self._segmenter is not None
        try:
            start = time.monotonic()
            work.pending = self._segmenter.backend.submit(work.inputs)
            work.inference_s = time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - a failed batch (backend error, OOM) must not stop the node
            self._batch_failed(work.items, "inference", exc)
            return False
        return True

    def _batch_failed(self, items: list[tuple[Camera, Frame]], step: str, exc: Exception) -> None:
        for cam, frame in items:
            self._frame_failed(cam, frame, f"{step} failed on {cam.topic}: {type(exc).__name__}: {exc}")

    def _frame_failed(self, cam: Camera, frame: Frame, message: str) -> None:
        """A good frame that will never go out: a counted failure, and out of progress."""
        self._record_error(cam, message, failed=True)
        self._ended(cam, frame)

    def _publish_batch(self, work: Work) -> None:
        assert self._segmenter is not None and work.pending is not None
        try:  # the prediction (waits for a GPU batch), the class-id check, labels at each frame's size
            start = time.monotonic()
            prediction = self._segmenter.collect(work.pending)
            work.inference_s += time.monotonic() - start  # not the time the batch waited between the stages
            results = self._segmenter.finish([frame.rgb for _, frame in work.items], prediction)
        except Exception as exc:  # noqa: BLE001 - as in _infer; ids outside the table are refused here
            self._batch_failed(work.items, "inference", exc)
            return
        for (cam, frame), seg in zip(work.items, results, strict=True):
            try:
                self._publish(cam, frame, seg, work.inference_s)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any one frame, or every camera stops
                self._batch_failed([(cam, frame)], "publishing", exc)

    def _publish(self, cam: Camera, frame: Frame, seg: Segmentation, inference_s: float) -> None:
        """Render what is subscribed (nothing else) and publish it as CDR written from the arrays."""
        assert self._segmenter is not None
        wanted = {k: pub for k, pub in cam.publishers.items() if pub is not None and pub.get_subscription_count()}
        images = self._segmenter.render(frame.rgb, seg, wanted, alpha=self._alpha,
                                        overlay_encoding=overlay_encoding(frame.encoding))
        if self._per_camera > 1:  # rendered alongside; published once the camera's earlier frames are out
            with self._lock:
                self._lock.wait_for(lambda: cam.finished >= frame.seq - 1)
        unsent: dict[str, str] = {}
        for kind, (array, encoding) in images.items():
            msg = image(array, encoding, frame.header)
            try:
                wanted[kind].publish(msg)
            except Exception as exc:  # noqa: BLE001 - one output that cannot go out (an rmw error) holds back no other
                unsent[kind] = f"{kind}: {type(exc).__name__}: {exc}"
        if unsent:  # the frame failed when its labels (the product), or all it had, did not go out; else it is out
            message = f"publishing failed on {cam.topic}: {'; '.join(unsent.values())}"
            if "labels" in unsent or len(unsent) == len(images):
                self._frame_failed(cam, frame, message)
                return
            self._record_error(cam, message)
        if cam.ground is not None:
            try:
                cam.ground.publish(frame.ros_header(), seg.labels)
            except (CameraInfoError, GroundError) as exc:  # labels went out; no points or grid for this frame
                self._record_error(cam, f"ground on {cam.topic}: {exc}")
        latency, wait = time.monotonic() - frame.received, frame.taken - frame.received
        with self._lock:
            s = cam.stats
            s.frames_out += 1
            s.latencies.append(latency)
            s.waits.append(wait)
            s.inference.append(inference_s)
            s.latency_total += latency
            s.wait_total += wait
            s.inference_total += inference_s
            cam.in_progress.pop(id(frame), None)

    # -- diagnostics ---------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        if self._segmenter is None or self._diag_pub is None:  # a tick racing deactivate or cleanup
            return
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
        counters = (s.frames_in, s.failed, s.frames_out, s.drops, s.errors, s.stamps.missing)
        d_in, d_failed, d_out, d_drops, d_errors, d_missing = (now - before for now, before in zip(counters, s.prev))
        s.prev = counters
        lat_ms = np.asarray(s.latencies, dtype=np.float64) * 1000.0
        camera_hz, out_hz = s.stamps.rate_hz(), d_out / dt
        # Good frames failed and none went out: inference (or publishing) is failing. Counted when a frame ends, not
        # when it was decoded: a frame still in inference as the period ends is not missing output (it was an ERROR
        # once, when a camera stopped with its last frame in flight).
        stuck = time.monotonic() - min(cam.in_progress.values()) if cam.in_progress else 0.0
        hung = max(STUCK_S, STUCK_RUNS * (sum(s.inference) / len(s.inference) if s.inference else 0.0))
        if d_failed and not d_out:
            level, text = DiagnosticStatus.ERROR, f"no output for {d_failed} good frames in the last {dt:.1f} s"
        elif stuck >= hung and not d_out:  # a frame that neither ends nor fails, far slower than the model runs
            level, text = DiagnosticStatus.ERROR, f"no output: a frame has been in progress for {stuck:.1f} s"
        else:
            problems = [f"{n} {what}" for n, what in ((d_errors, "errors"), (d_drops, "drops"),
                                                      (d_missing, "frames missing before the node")) if n]
            jumps, more_jumps = s.stamps.take_jumps()
            problems += [f"stamps jumped {ns / 1e9:+.1f} s" for ns in jumps]
            problems += [f"{more_jumps} more stamp jumps"] if more_jumps else []
            if d_in and out_hz < SLOW_RATIO * camera_hz:
                problems.append(f"processing {out_hz:.1f} Hz of a {camera_hz:.1f} Hz camera")
            if cam.ground is not None and cam.ground.waiting:
                problems.append(f"no camera_info on {cam.ground.info_topic} yet (no points, no ground_grid)")
            if problems:
                level, text = DiagnosticStatus.WARN, f"{', '.join(problems)} in the last {dt:.1f} s"
            else:
                level, text = DiagnosticStatus.OK, "ok" if s.frames_out else "waiting for images"
        values = {
            "rate_in_hz": f"{d_in / dt:.2f}", "rate_out_hz": f"{out_hz:.2f}",
            "camera_rate_hz": f"{camera_hz:.2f}", "frames_missing": str(s.stamps.missing),
            "frames_in": str(s.frames_in), "frames_out": str(s.frames_out), "drops": str(s.drops),
            "latency_mean_ms": _mean_ms(s.latencies),
            "latency_p99_ms": f"{np.percentile(lat_ms, 99):.2f}" if lat_ms.size else "nan",
            "wait_mean_ms": _mean_ms(s.waits), "inference_mean_ms": _mean_ms(s.inference),
            "latency_total_ms": f"{1000.0 * s.latency_total:.1f}", "wait_total_ms": f"{1000.0 * s.wait_total:.1f}",
            "inference_total_ms": f"{1000.0 * s.inference_total:.1f}",
            "backend": backend, "device": device, "model": self._model,
            "errors": str(s.errors), "last_error": s.last_error,
        }
        return DiagnosticStatus(level=level, name=f"unet_perception: {cam.topic}",
                                message=text, hardware_id=cam.topic,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])

    # -- shutdown -------------------------------------------------------------------------------------
    def destroy_node(self) -> None:
        """Stop and join the worker, close the backend, then destroy the node."""
        self._deactivate()
        self._release()
        super().destroy_node()


def _mean_ms(seconds: Collection[float]) -> str:
    return f"{1000.0 * sum(seconds) / len(seconds):.2f}" if seconds else "nan"


def _wake_spin_on_signals(node: SegmentationNode) -> Callable[[], None]:
    """Let a signal reach the main thread while ``rclpy.spin`` waits in rcl: Python writes a byte to its wake-up fd
    when a signal arrives, and a small thread turns that byte into a guard condition that ends the wait, so the
    main thread returns to Python and raises KeyboardInterrupt there."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    guard = node.create_guard_condition(lambda: None)

    def relay() -> None:
        try:
            while os.read(read_fd, 64):  # b"": the write end was closed (done() below)
                guard.trigger()
        except Exception:  # noqa: BLE001 - the node is already destroyed: the main thread is ending anyway
            pass
        finally:
            os.close(read_fd)

    def done() -> None:
        """Stop relaying (the relay thread ends and closes its end of the pipe)."""
        signal.set_wakeup_fd(-1)
        os.close(write_fd)

    threading.Thread(target=relay, name="signal_wakeup", daemon=True).start()
    signal.set_wakeup_fd(write_fd)
    return done


def main(args: list[str] | None = None) -> int:
    """``ros2 run unet_perception segmentation_node`` / ``python -m unet_perception.node``."""
    profile = apply_node_env()  # before rclpy.init: Fast DDS reads it when the participant is created
    # Ctrl-C and SIGTERM (systemd, docker stop, ros2 launch) are handled here, not by rclpy: rclpy's handler shuts
    # the context down at once from its own thread, under whatever the process is doing (a configure, a batch being
    # published, a log line half sent to rosout), which then fails with "publisher's context is invalid". Here a
    # signal is a KeyboardInterrupt in the main thread between two Python steps; the node is destroyed (workers
    # joined, their last publish done) and only then is the context shut down.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    for signum in signals:
        signal.signal(signum, signal.default_int_handler)
    if not profile:
        rclpy.logging.get_logger(NODE_NAME).warning(missing_profile_note())
    node: SegmentationNode | None = None
    stop_relay: Callable[[], None] | None = None
    try:
        node = SegmentationNode()  # a signal during start-up abandons it: KeyboardInterrupt out of configure
        node.get_logger().debug(f"Fast DDS profile: {profile or 'none'}")
        stop_relay = _wake_spin_on_signals(node)
        rclpy.spin(node)
    except StartupError as exc:
        rclpy.logging.get_logger(NODE_NAME).fatal(str(exc))
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        # The clean-up (join the stages, close the backend: at most one batch) is not interrupted by a second
        # signal: Ctrl-C under ros2 launch is two SIGINTs, the terminal's and launch's own, a few ms apart.
        # Launch, docker and systemd escalate to SIGKILL if it ever hangs.
        for signum in signals:
            signal.signal(signum, signal.SIG_IGN)
        if stop_relay is not None:
            stop_relay()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0

if __name__ == "__main__":
    sys.exit(main())
