"""The output topic naming rule, shared by the node and the offline bag labeller.

An input ``<ns>/image_raw`` (or ``<ns>/image_raw/compressed``, or any ``<ns>/<name>``) gives
``<ns>/segmentation/labels``, ``<ns>/segmentation/color`` and ``<ns>/segmentation/overlay``.
Relative names stay relative, so node namespaces and remapping apply as usual.
"""

from __future__ import annotations

OUTPUTS = ("labels", "color", "overlay")


def is_compressed_topic(topic: str) -> bool:
    """Topics ending in ``/compressed`` carry ``sensor_msgs/CompressedImage`` (image_transport's rule)."""
    return topic.rstrip("/").endswith("/compressed")


def output_topics(input_topic: str) -> dict[str, str]:
    """``{"labels": ..., "color": ..., "overlay": ...}`` for one camera input topic."""
    topic = input_topic.rstrip("/")
    if not topic:
        raise ValueError("an image topic name is empty; give a topic like 'image_raw' or '/camera/image_raw'")
    if is_compressed_topic(topic):
        topic = topic[: -len("/compressed")]
    ns, _, _ = topic.rpartition("/")
    prefix = f"{ns}/segmentation" if ns or topic.startswith("/") else "segmentation"
    return {name: f"{prefix}/{name}" for name in OUTPUTS}
