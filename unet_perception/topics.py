"""The output topic naming rule, shared by the node, the offline bag labeller and the benchmarks.

A camera image ``<ns>/<image>`` (``/camera/image_raw``), or its compressed transport
``<ns>/<image>/compressed``, gives ``<ns>/segmentation/{labels,confidence,color,overlay,label_info}``
(``/camera/segmentation/labels``). The node applies the rule to each input topic *after* rclpy has
resolved it (namespace, ``~`` and ``-r`` remapping), so outputs follow the camera wherever it is remapped.

One camera namespace holds one camera's outputs: two inputs that would share ``<ns>/segmentation``
(``/cam/left`` and ``/cam/right``, or the raw and ``/compressed`` topics of one camera) are refused
by :func:`camera_outputs` instead of interleaving two cameras on one topic.
"""

from __future__ import annotations

from collections.abc import Iterable

OUTPUTS = ("labels", "color", "overlay")  # the images every model gives
CONFIDENCE = "confidence"                  # mono8, only from models with a confidence output
LABEL_INFO = "label_info"                  # vision_msgs/LabelInfo, the class map
SEGMENTATION = "segmentation"
POINTS = "points"                          # sensor_msgs/PointCloud2, ground projection (ground.enabled)
GROUND_GRID = "ground_grid"                # nav_msgs/OccupancyGrid, ground projection (ground.enabled)


def is_compressed_topic(topic: str) -> bool:
    """Topics ending in ``/compressed`` carry ``sensor_msgs/CompressedImage`` (image_transport's rule)."""
    return topic.rstrip("/").endswith("/compressed")


def output_kinds(has_confidence: bool) -> tuple[str, ...]:
    """The image outputs of a model: ``OUTPUTS``, and ``CONFIDENCE`` when it has that output."""
    return (*OUTPUTS, CONFIDENCE) if has_confidence else OUTPUTS


def camera_image(input_topic: str) -> str:
    """The image a topic carries: ``/cam/image_raw/compressed`` -> ``/cam/image_raw``."""
    topic = input_topic.rstrip("/")
    if not topic:
        raise ValueError("an image topic name is empty; give a topic like 'image_raw' or '/camera/image_raw'")
    return topic[: -len("/compressed")] if is_compressed_topic(topic) else topic


def camera_info_topic(input_topic: str) -> str:
    """The CameraInfo beside an image, as image_transport names it: ``/cam/image_raw[/compressed]`` ->
    ``/cam/camera_info``; relative stays relative."""
    ns, _, _ = camera_image(input_topic).rpartition("/")
    return f"{ns}/camera_info" if ns or input_topic.startswith("/") else "camera_info"


def output_prefix(input_topic: str) -> str:
    """``<ns>/segmentation`` for an input ``<ns>/<image>[/compressed]``; relative stays relative."""
    ns, _, _ = camera_image(input_topic).rpartition("/")
    return f"{ns}/{SEGMENTATION}" if ns or input_topic.startswith("/") else SEGMENTATION


def output_topics(input_topic: str, kinds: Iterable[str] = OUTPUTS) -> dict[str, str]:
    """``{"labels": "<ns>/segmentation/labels", ...}`` for one input, one entry per kind."""
    prefix = output_prefix(input_topic)
    return {kind: f"{prefix}/{kind}" for kind in kinds}


def camera_outputs(resolved_topics: Iterable[str]) -> dict[str, str]:
    """Resolved input topics -> their output prefix (``<ns>/segmentation``), in order, repeats dropped.

    Raises ValueError naming both inputs when two different inputs would publish on the same outputs.
    """
    plan: dict[str, str] = {}
    owner: dict[str, str] = {}
    for topic in resolved_topics:
        if topic in plan:
            continue  # ['image_raw', '/image_raw'] in the root namespace: one camera, subscribed once
        prefix = output_prefix(topic)
        if prefix in owner:
            other = owner[prefix]
            if camera_image(other) == camera_image(topic):
                hint = "they are the raw and compressed topics of one camera; subscribe to one of them"
            else:
                hint = (f"give each camera its own namespace (e.g. {prefix.rsplit('/', 1)[0]}/left/image_raw) "
                        "or remap the camera topics")
            raise ValueError(f"inputs '{other}' and '{topic}' would both publish on {prefix}/*: {hint}")
        owner[prefix] = topic
        plan[topic] = prefix
    return plan
