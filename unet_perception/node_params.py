"""The segmentation node's parameters: every one declared from this table (default, description, constraints),
the checks the descriptors cannot express, and the ``class_colors`` parser. docs/node.md's parameter table is
checked against ``PARAMS``. No rclpy node here, so the surface is readable and testable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from unet_perception.backends.factory import DEVICES, KINDS, PRECISIONS
from unet_perception.class_table import ClassTable
from unet_perception.model_contract import UNKNOWN_LABEL
from unet_perception.topics import output_kinds

QOS_RELIABILITY = ("best_effort", "reliable")  # input_qos / output_qos values
OVERLAP = ("auto", "always", "never")  # not on/off: YAML (and so `-p overlap:=on`) reads those as booleans


class StartupError(RuntimeError):
    """A parameter, model or backend problem that stops start-up; the message names what to fix."""


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
              "sensor_msgs/CompressedImage. Resolved (namespace, remapping) first; the outputs of <ns>/<image> go to "
              "<ns>/segmentation/{labels,confidence,color,overlay,label_info}, with ground.enabled also points and "
              "ground_grid."),
    ParamSpec("model_path", "", "ONNX model following the unet_perception contract; empty = the package's "
              "models/unet_camvid.onnx."),
    ParamSpec("backend", "auto", "Inference backend; auto = ONNX Runtime on device cpu; on device cuda TensorRT, "
              "else ONNX Runtime's CUDA provider.", choices=KINDS),
    ParamSpec("device", "cpu", "Where inference runs, for every backend: cpu or cuda (tensorrt: cuda only).",
              choices=DEVICES),
    ParamSpec("max_batch", 0, "At most this many camera frames run as one batch; 0 = auto: 1 on device cpu (a "
              "batch there takes as long as its frames one by one, so frames go one at a time, the cameras taking "
              "turns), 4 on cuda.", int_range=(0, 64)),
    ParamSpec("precision", "fp32", "fp32 = the model file as it is; fp16 = its float16 conversion; int8 = its "
              "Q/DQ twin (<model>_int8.onnx). torch: fp16 = autocast on cuda.", choices=PRECISIONS),
    ParamSpec("gpu_id", 0, "device cuda: CUDA device index.", int_range=(0, 63)),
    ParamSpec("threads", 0, "device cpu: ONNX Runtime / torch threads of each inference; 0 = the library's "
              "default with one worker, else the cores this process may use shared among the workers.",
              int_range=(0, 256)),
    ParamSpec("workers", 0, "How many frames are inferred at the same time, each by a thread of its own; each "
              "camera's outputs keep the order the frames arrived in; more workers than cameras infer several frames "
              "of a camera at once. 0 = auto: on device cpu one per camera up to the cores this process may use (4 "
              "cameras on 2 cores: 2 frames at once on a thread each: more frames per second when other work shares "
              "the cores, each one slower), 1 on cuda or with max_batch above 1. 1 = lowest latency. More than 1 "
              "needs device cpu, stages in turn (overlap never or auto) and max_batch 0 or 1.", int_range=(0, 64)),
    ParamSpec("spinning", True, "device cpu, onnxruntime: an inference thread with nothing to do spins for a "
              "while (spin_us) before it sleeps, so the next operator of a run starts without waking it; false = it "
              "sleeps at once (each wake-up costs time, most on a VM)."),
    ParamSpec("spin_us", 100, "With spinning: at most this many microseconds of spin, enough to bridge the gaps "
              "inside a run, over soon after it; 0 = ONNX Runtime's own spin, which holds a core for most of the "
              "time between runs (faster only on a machine with cores to spare). Needs onnxruntime 1.26 or later, "
              "else it does not spin.", int_range=(0, 1_000_000)),
    ParamSpec("overlap", "auto", "always: decode/resize, inference and render/publish run in three threads "
              "and overlap (TensorRT: copies and compute of 3 batches in flight); never: one thread, in turn (lowest "
              "latency when inference takes every core); auto: always for device cuda, never for cpu.",
              choices=OVERLAP),
    ParamSpec("input_thread", True, "Camera frames are taken by a thread that waits on the image subscriptions "
              "alone (about a third of the CPU per message of rclpy's executor); false = by the node's executor, "
              "like its other callbacks."),
    ParamSpec("engine_cache_dir", "", "tensorrt: engine and timing cache folder (also the fp16 model); empty = "
              "~/.cache/unet_perception/engines. Refused when anyone but its owner (you or root) can write it "
              "(docs/tensorrt.md)."),
    ParamSpec("workspace_mb", 1024, "tensorrt: builder workspace in MiB.", int_range=(16, 1 << 20)),
    ParamSpec("checkpoint", "", "torch: training checkpoint (.pt) the model was exported from; empty = the .pt "
              "beside the model."),
    ParamSpec("input_qos", "best_effort", "Reliability of the image subscriptions; best_effort is the "
              "sensor-data QoS camera drivers publish with and also hears reliable publishers.",
              choices=QOS_RELIABILITY),
    ParamSpec("output_qos", "reliable", "Reliability of the image publishers; reliable serves reliable "
              "subscribers (rviz2's default) and best-effort ones alike.", choices=QOS_RELIABILITY),
    ParamSpec("qos_depth", 5, "History depth (keep last) of image subscriptions and publishers.",
              int_range=(1, 100)),
    ParamSpec("unknown_threshold", 0, f"Pixels whose confidence (0-255) is below this get label {UNKNOWN_LABEL} "
              "(unknown); 0 = off. Needs a model with a confidence output.", int_range=(0, 255)),
    ParamSpec("publish_labels", True, "Publish <ns>/segmentation/labels (mono8 class ids)."),
    ParamSpec("publish_confidence", True, "Publish <ns>/segmentation/confidence (mono8, 0-255 = the winning "
              "class's probability) when the model has a confidence output."),
    ParamSpec("publish_color", True, "Publish <ns>/segmentation/color (rgb8 colour mask)."),
    ParamSpec("publish_overlay", True, "Publish <ns>/segmentation/overlay (input blended with the mask)."),
    ParamSpec("overlay_alpha", 0.5, "Weight of the colour mask in the overlay; changeable at run time.",
              float_range=(0.0, 1.0), read_only=False),
    ParamSpec("max_image_pixels", 4096 * 4096, "Frames with more pixels are refused as bad input.",
              int_range=(1, 1 << 30)),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", float_range=(0.05, 60.0)),
    ParamSpec("class_colors", Parameter.Type.STRING_ARRAY, "Colour overrides, 'Class=R,G,B' with a class "
              "name of the model (class names and ids always come from the model)."),
    ParamSpec("ground.enabled", False, "Project the labels onto flat ground: per camera subscribe to its "
              "camera_info (the image's sibling) and publish <ns>/segmentation/points and ground_grid."),
    ParamSpec("ground.source", "auto", "Where the ground is: tf = the optical frame's pose in ground.base_frame "
              "(z = 0 is the ground), needs tf2_ros; parameters = ground.camera_height/pitch/roll; auto = tf when "
              "tf2_ros imports, else parameters.", choices=("auto", "tf", "parameters")),
    ParamSpec("ground.base_frame", "base_link", "Frame of the ground grid; with source tf the ground is its "
              "z = 0 plane."),
    ParamSpec("ground.camera_height", 1.5, "source parameters: metres of the optical centre above the ground "
              "(> 0).", float_range=(0.0, 100.0)),
    ParamSpec("ground.camera_pitch", 0.0, "source parameters: radians, positive = optical axis tilted down "
              "towards the ground.", float_range=(-1.5, 1.5)),
    ParamSpec("ground.camera_roll", 0.0, "source parameters: radians about the tilted optical axis, positive = "
              "clockwise as seen from behind the camera.", float_range=(-1.5, 1.5)),
    ParamSpec("ground.max_range", 40.0, "Pixels whose ray meets the ground further than this many metres from "
              "the camera (or not at all) are NaN in points and fall in no grid cell.", float_range=(0.0, 10000.0)),
    ParamSpec("ground.stride", 1, "points has one point per stride x stride pixels: row r, column c = pixel "
              "(c*stride, r*stride); the grid counts the same pixels.", int_range=(1, 64)),
    ParamSpec("ground.grid_resolution", 0.2, "Ground grid cell size in metres.", float_range=(0.01, 100.0)),
    ParamSpec("ground.grid_width", 40.0, "Ground grid extent in metres along base_frame's x (forward).",
              float_range=(0.1, 10000.0)),
    ParamSpec("ground.grid_height", 40.0, "Ground grid extent in metres along base_frame's y (left).",
              float_range=(0.1, 10000.0)),
    ParamSpec("ground.grid_origin", [0.0, -20.0], "[x, y] in base_frame of the grid's cell (0, 0) corner; the "
              "default puts the grid ahead of the camera, centred on it."),
    ParamSpec("ground.free_classes", Parameter.Type.STRING_ARRAY, "Drivable classes (grid 0 where more than "
              "half a cell's pixels are); empty = the model's Road (CamVid, CARLA) or road (Cityscapes)."),
    ParamSpec("ground.obstacle_classes", Parameter.Type.STRING_ARRAY, "Obstacle classes (grid 100 where more "
              "than half a cell's pixels are); empty = every class of the model not in free_classes."),
    ParamSpec("autostart", True, "Configure and activate at start-up; false leaves the node unconfigured for "
              "a lifecycle manager (nav2_lifecycle_manager, ros2 lifecycle set)."),
)
# The list parameters without a default (rclpy reads an empty default list as a byte array, so they are declared
# typed and unset); the node answers them as an empty string array.
EMPTY_LISTS = frozenset(spec.name for spec in PARAMS if spec.default == Parameter.Type.STRING_ARRAY)


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


def validate(p: dict[str, Any]) -> list[str]:
    """The checks the descriptors cannot express, on the values read at configure; returns the
    input topics. StartupError quoting the bad value."""
    for spec in PARAMS:
        if spec.choices and p[spec.name] not in spec.choices:
            raise StartupError(f"parameter '{spec.name}' is '{p[spec.name]}'; it must be one of "
                               f"{', '.join(spec.choices)}")
    topics = list(p["image_topics"])
    if not topics or any(not t.strip("/") for t in topics):
        raise StartupError(f"parameter 'image_topics' is {topics}; give one or more topic names, "
                           "e.g. ['camera/image_raw']")
    if p["workers"] > 1 and p["device"] != "cpu":
        raise StartupError(f"parameter 'workers' is {p['workers']} with device '{p['device']}'; more than one "
                           "worker needs device cpu (on a GPU, overlap and batches keep it busy): set workers to 0 "
                           "or 1")
    if p["workers"] > 1 and p["max_batch"] > 1:
        raise StartupError(f"parameter 'workers' is {p['workers']} with max_batch {p['max_batch']}; choose one way "
                           "to serve several cameras at once: workers with max_batch 0 or 1 (on the cpu), or batches "
                           "with workers 0 or 1 (a worker free while another runs a batch kept serving one camera)")
    if p["workers"] > 1 and p["overlap"] == "always":
        raise StartupError(f"parameter 'workers' is {p['workers']} with overlap 'always'; workers run the stages "
                           "in turn: set overlap to never or auto, or workers to 0 or 1")
    if not any(p[f"publish_{kind}"] for kind in output_kinds(has_confidence=True)):
        raise StartupError("publish_labels, publish_confidence, publish_color and publish_overlay are all "
                           "false; switch at least one output on")
    return topics

