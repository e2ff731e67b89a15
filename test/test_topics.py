"""The output naming rule (pure): <ns>/<image>[/compressed] -> <ns>/segmentation/*, repeats dropped, clashes refused."""

from __future__ import annotations

import pytest

from unet_perception.topics import (
    camera_image,
    camera_info_topic,
    camera_outputs,
    is_compressed_topic,
    output_prefix,
    output_topics,
)


@pytest.mark.parametrize("topic, prefix", [
    ("/camera/image_raw", "/camera/segmentation"),
    ("/camera/image_raw/compressed", "/camera/segmentation"),
    ("/car/front/image_rect", "/car/front/segmentation"),
    ("/image_raw", "/segmentation"),
    ("image_raw", "segmentation"),          # relative stays relative (the bag tool's names)
    ("front/image_raw/compressed", "front/segmentation"),
])
def test_output_prefix(topic: str, prefix: str) -> None:
    assert output_prefix(topic) == prefix


def test_output_topics_and_kinds() -> None:
    assert output_topics("/camera/image_raw") == {"labels": "/camera/segmentation/labels",
                                                  "color": "/camera/segmentation/color",
                                                  "overlay": "/camera/segmentation/overlay"}
    assert output_topics("/c/image_raw", ["confidence", "label_info"]) == {
        "confidence": "/c/segmentation/confidence", "label_info": "/c/segmentation/label_info"}
    assert is_compressed_topic("/c/image_raw/compressed") and not is_compressed_topic("/c/image_raw")
    assert camera_image("/c/image_raw/compressed") == "/c/image_raw"
    with pytest.raises(ValueError, match="empty"):
        output_prefix("/")


def test_repeats_are_subscribed_once_in_order() -> None:
    assert camera_outputs(["/b/image_raw", "/a/image_raw", "/b/image_raw"]) == {
        "/b/image_raw": "/b/segmentation", "/a/image_raw": "/a/segmentation"}


@pytest.mark.parametrize("topics, needles", [
    (["/cam/left", "/cam/right"], ["'/cam/left' and '/cam/right'", "/cam/segmentation/*", "own namespace"]),
    (["/cam/image_raw", "/cam/image_raw/compressed"], ["raw and compressed topics of one camera"]),
    (["/image_raw", "/image_rect"], ["/segmentation/*"]),
])
def test_two_inputs_never_share_outputs(topics: list[str], needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        camera_outputs(topics)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(("topic", "info"), [
    ("/camera/image_raw", "/camera/camera_info"), ("/camera/image_raw/compressed", "/camera/camera_info"),
    ("/car/front/image_rect", "/car/front/camera_info"), ("/image_raw", "/camera_info"),
    ("image_raw", "camera_info"), ("front/image_raw/compressed", "front/camera_info"),
])
def test_camera_info_is_the_image_topics_sibling(topic: str, info: str) -> None:
    """image_transport's rule: the CameraInfo of <ns>/<image>[/compressed] is <ns>/camera_info."""
    assert camera_info_topic(topic) == info
