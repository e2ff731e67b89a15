"""Ground projection through the node on a real rclpy graph: camera_info in (the image topic's sibling), organised
points and the ground grid out, bad CameraInfo and mismatched frames counted, no CameraInfo = WARN with labels.

References are computed here: points from the closed-form ray-plane intersection (test_ground.camera_axes), the
grid by binning those points and counting the received labels per cell.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from nav_msgs.msg import OccupancyGrid
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField

from ros_graph import TIMEOUT_S, RosGraph, wait_matched, wait_until
from test_ground import camera_axes
from unet_perception.node_params import StartupError
from unet_perception.tools.camera_sim import compressed_message, image_message, synthetic_frame

W, H, F, CX, CY = 64, 48, 60.0, 31.5, 20.0
HEIGHT, PITCH, ROLL, STRIDE = 1.2, 0.15, 0.1, 2
GRID = {"ground.grid_resolution": 0.25, "ground.grid_width": 8.0, "ground.grid_height": 6.0,
        "ground.grid_origin": [0.0, -3.0]}
CAMVID_ROAD = 3
RELIABLE = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)


def info_message(fx: float = F, width: int = W, frame_id: str = "cam_optical") -> CameraInfo:
    msg = CameraInfo(width=width, height=H, distortion_model="plumb_bob")
    msg.header.frame_id = frame_id
    msg.k = [fx, 0.0, CX, 0.0, F, CY, 0.0, 0.0, 1.0]
    msg.d = [0.0] * 5
    return msg


def reference_points() -> np.ndarray:
    """[rows, cols, 3] optical-frame ground points of pixels (c*STRIDE, r*STRIDE); NaN above the horizon."""
    u, v = np.meshgrid(np.arange(0, W, STRIDE), np.arange(0, H, STRIDE))
    rays = np.stack([(u - CX) / F, (v - CY) / F, np.ones(u.shape)], axis=-1)
    descent = -(rays @ camera_axes(PITCH, ROLL).T)[..., 2]
    with np.errstate(divide="ignore"):
        t = np.where(descent > 0, HEIGHT / descent, np.nan)
    return rays * t[..., None]


def reference_grid(labels: np.ndarray) -> np.ndarray:
    """Bin each sampled pixel's ground point into the grid, then a strict majority of road (free) / other
    CamVid classes (obstacles)."""
    pts = reference_points()
    ground = pts @ camera_axes(PITCH, ROLL).T + [0.0, 0.0, HEIGHT]
    res, cols, rows = 0.25, 32, 24
    col = np.floor(ground[..., 0] / res)
    row = np.floor((ground[..., 1] + 3.0) / res)
    ok = np.isfinite(col) & (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    ok &= np.linalg.norm(np.nan_to_num(pts, nan=1e9), axis=-1) <= 40.0
    cell = (row[ok] * cols + col[ok]).astype(int)
    sampled = labels[::STRIDE, ::STRIDE][ok]
    total = np.bincount(cell, minlength=rows * cols)
    free = np.bincount(cell[sampled == CAMVID_ROAD], minlength=rows * cols)
    obstacle = np.bincount(cell[(sampled != CAMVID_ROAD) & (sampled < 11)], minlength=rows * cols)
    out = np.full(rows * cols, -1, np.int8)
    out[2 * free > total] = 0
    out[2 * obstacle > total] = 100
    return out.reshape(rows, cols)


def cloud_array(msg: PointCloud2) -> np.ndarray:
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == \
        [("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1), ("z", 8, PointField.FLOAT32, 1)]
    assert (msg.point_step, msg.row_step, msg.is_bigendian, msg.is_dense) == (12, 12 * msg.width, False, False)
    return np.frombuffer(bytes(msg.data), "<f4").reshape(msg.height, msg.width, 3)


def ground_node(graph: RosGraph, model: str, topics: list[str]):  # type: ignore[no-untyped-def]
    params: dict[str, Any] = {"ground.enabled": True, "ground.source": "parameters", "ground.camera_height": HEIGHT,
              "ground.camera_pitch": PITCH, "ground.camera_roll": ROLL, "ground.stride": STRIDE, **GRID}
    return graph.segmentation_node(model_path=model, image_topics=topics, diagnostics_period=0.2, **params)


def camera_rig(graph: RosGraph, model: str, ns: str):  # type: ignore[no-untyped-def]
    """A ground node for camera ``<ns>/image_raw`` with its image and camera_info publishers and a labels
    collector, all matched: (node, image publisher, info publisher, labels collector)."""
    node = ground_node(graph, model, [f"{ns}/image_raw"])
    image = graph.publisher(Image, f"{ns}/image_raw")
    info = graph.publisher(CameraInfo, f"{ns}/camera_info", RELIABLE)
    labels = graph.collect(Image, f"{ns}/segmentation/labels", RELIABLE)
    wait_matched(image, [labels])
    wait_until(lambda: info.get_subscription_count() > 0, what="camera_info subscription")
    return node, image, info, labels


def statuses(diag, topic: str, level: int, text: str) -> list[DiagnosticStatus]:  # type: ignore[no-untyped-def]
    return [s for m in diag.wait_for(0) for s in m.status
            if s.hardware_id == topic and s.level == level and text in s.message]


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_points_and_grid_for_cameras_with_camera_info(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """/cam_a/image_raw reads /cam_a/camera_info, /cam_b/image_raw/compressed reads /cam_b/camera_info; B waits
    (WARN, labels still out) until its CameraInfo comes."""
    with RosGraph() as graph:
        ground_node(graph, str(tiny_model), ["/cam_a/image_raw", "/cam_b/image_raw/compressed"])
        image_a = graph.publisher(Image, "/cam_a/image_raw")
        image_b = graph.publisher(CompressedImage, "/cam_b/image_raw/compressed")
        info_a = graph.publisher(CameraInfo, "/cam_a/camera_info", RELIABLE)
        info_b = graph.publisher(CameraInfo, "/cam_b/camera_info", RELIABLE)
        out = {(cam, kind): graph.collect(msg_type, f"/{cam}/segmentation/{kind}", RELIABLE)
               for cam in ("cam_a", "cam_b")
               for kind, msg_type in (("labels", Image), ("points", PointCloud2), ("ground_grid", OccupancyGrid))}
        diag = graph.collect(DiagnosticArray, "/diagnostics", 10)
        wait_matched(image_b, [out["cam_b", "labels"], out["cam_b", "points"], out["cam_b", "ground_grid"]])
        wait_until(lambda: info_a.get_subscription_count() > 0 and info_b.get_subscription_count() > 0,
                   what="the node's camera_info subscriptions")

        frame_b = compressed_message(synthetic_frame(W, H, 1), "png", frame_id="cam_b_optical",
                                     stamp=Time(sec=7, nanosec=5))
        image_b.publish(frame_b)
        out["cam_b", "labels"].wait_for(1)
        wait_until(lambda: bool(statuses(diag, "/cam_b/image_raw/compressed", DiagnosticStatus.WARN,
                                         "no camera_info on /cam_b/camera_info yet")), what="WARN without info")
        assert len(out["cam_b", "points"]) == 0 and len(out["cam_b", "ground_grid"]) == 0

        stamp = Time(sec=42, nanosec=77)
        frame_a = image_message(synthetic_frame(W, H, 2), "rgb8", frame_id="cam_a_optical", stamp=stamp)
        deadline = time.monotonic() + TIMEOUT_S
        while not (len(out["cam_a", "ground_grid"]) and len(out["cam_b", "points"])):
            assert time.monotonic() < deadline, "no points/grid after camera_info"
            info_a.publish(info_message())
            info_b.publish(info_message(frame_id="cam_b_optical"))
            time.sleep(0.2)
            image_a.publish(frame_a)
            image_b.publish(frame_b)
            time.sleep(0.3)
        labels_a = out["cam_a", "labels"].wait_for(1)
        points_a = out["cam_a", "points"].wait_for(1)[0]
        grid_a = out["cam_a", "ground_grid"].wait_for(1)[0]
        points_b = out["cam_b", "points"].wait_for(1)[0]

    rows, cols = math.ceil(H / STRIDE), math.ceil(W / STRIDE)
    for msg, frame_id in ((points_a, "cam_a_optical"), (points_b, "cam_b_optical")):
        assert (msg.height, msg.width) == (rows, cols) and msg.header.frame_id == frame_id
        got, want = cloud_array(msg), reference_points()
        finite = np.isfinite(want).all(axis=-1) & (np.linalg.norm(np.nan_to_num(want), axis=-1) <= 40.0)
        assert finite.sum() > 200 and (~finite).sum() > 50  # ground below, sky above the horizon
        np.testing.assert_array_equal(np.isnan(got).any(axis=-1), ~finite)
        err = np.linalg.norm(got[finite] - want[finite], axis=-1) / np.linalg.norm(want[finite], axis=-1)
        assert err.max() < 0.005
    assert points_a.header.stamp == stamp and points_b.header.stamp == Time(sec=7, nanosec=5)

    assert grid_a.header.frame_id == "base_link" and grid_a.header.stamp == stamp
    info = grid_a.info
    assert (info.width, info.height, info.resolution) == (32, 24, pytest.approx(0.25))
    assert (info.origin.position.x, info.origin.position.y) == (0.0, -3.0)
    labels = next(np.frombuffer(bytes(m.data), np.uint8).reshape(H, W) for m in labels_a if m.header.stamp == stamp)
    cells = np.asarray(grid_a.data, np.int8).reshape(24, 32)
    want_cells = reference_grid(labels)
    assert (want_cells != -1).sum() > 20
    np.testing.assert_array_equal(cells, want_cells)


def test_bad_camera_info_and_mismatched_frames_are_counted(tiny_model) -> None:  # type: ignore[no-untyped-def]
    topic = "/cam/image_raw"
    with RosGraph() as graph:
        node, image, info, labels = camera_rig(graph, str(tiny_model), "/cam")
        points = graph.collect(PointCloud2, "/cam/segmentation/points", RELIABLE)
        diag = graph.collect(DiagnosticArray, "/diagnostics", 10)
        wait_matched(image, [points])
        stats = node._cameras[0].stats

        for bad, reason in ((info_message(fx=0.0), "focal lengths"), (info_message(fx=math.nan), "finite")):
            before = stats.errors
            info.publish(bad)
            wait_until(lambda b=before: stats.errors > b, what=f"bad camera_info ({reason}) counted")  # type: ignore[misc]
            assert reason in stats.last_error and "bad camera_info on /cam/camera_info" in stats.last_error
        image.publish(image_message(synthetic_frame(W, H, 0), "rgb8", frame_id="cam_optical"))
        labels.wait_for(1)  # refused info: still waiting, labels still out
        status = next(iter(wait_for_status(diag, topic, "no camera_info on /cam/camera_info yet")))
        assert int(values(status)["errors"]) >= 2 and "bad camera_info" in values(status)["last_error"]

        info.publish(info_message(width=W * 2))  # a good CameraInfo, for frames twice as wide
        wait_until(lambda: not node._cameras[0].ground.waiting, what="camera_info taken")
        before = stats.errors
        image.publish(image_message(synthetic_frame(W, H, 1), "rgb8", frame_id="cam_optical"))
        labels.wait_for(2)
        wait_until(lambda: stats.errors > before, what="size mismatch counted")
        assert f"frame is {W}x{H} but camera_info says {2 * W}x{H}" in stats.last_error
        image.publish(image_message(synthetic_frame(2 * W, H, 2), "rgb8", frame_id="cam_optical"))
        assert points.wait_for(1)[0].width == W  # 2W / stride 2: the matching frame gets its points
        assert len(points) == 1


def wait_for_status(diag, topic: str, text: str) -> list[DiagnosticStatus]:  # type: ignore[no-untyped-def]
    wait_until(lambda: bool(statuses(diag, topic, DiagnosticStatus.WARN, text)), what=f"WARN '{text}'")
    return statuses(diag, topic, DiagnosticStatus.WARN, text)


def test_ground_parameters_are_checked(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with RosGraph() as graph:
        cases: tuple[tuple[dict[str, Any], str], ...] = (
            ({"ground.camera_height": 0.0}, "camera_height is 0.0"),
            ({"ground.free_classes": ["Raod"]}, r"\['Raod'\], which the model does not have"),
            ({"ground.grid_origin": [1.0]}, r"grid_origin is \[1.0\]"))
        for params, reason in cases:
            with pytest.raises(StartupError, match=reason):
                enabled: dict[str, Any] = {"ground.enabled": True, "ground.source": "parameters", **params}
                graph.segmentation_node(model_path=str(tiny_model), **enabled)
        try:
            import tf2_ros  # noqa: F401
        except ImportError:
            with pytest.raises(StartupError, match="ground.source is 'tf' but tf2_ros does not import"):
                tf: dict[str, Any] = {"ground.enabled": True, "ground.source": "tf"}
                graph.segmentation_node(model_path=str(tiny_model), **tf)


def test_unsubscribed_outputs_and_repeated_camera_info_cost_nothing(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Nothing is computed while nobody subscribes to points or grid; then rays and projection once for a
    CameraInfo a driver repeats every frame, and again only when the calibration changes."""
    with RosGraph() as graph:
        node, image, info, labels = camera_rig(graph, str(tiny_model), "/cost")
        ground = node._cameras[0].ground

        def send(count: int, collector, fx: float = F) -> None:  # type: ignore[no-untyped-def]
            for _ in range(count):
                before = len(collector)
                info.publish(info_message(fx=fx))
                wait_until(lambda: ground._model is not None and ground._model.k[0] == fx, what="info taken")
                image.publish(image_message(synthetic_frame(W, H, 0), "rgb8", frame_id="cam_optical"))
                collector.wait_for(before + 1)

        send(3, labels)
        assert (ground.ray_builds, ground.projection_builds) == (0, 0)
        points = graph.collect(PointCloud2, "/cost/segmentation/points", RELIABLE)
        wait_until(lambda: ground.points_pub.get_subscription_count() > 0, what="points subscriber")
        send(3, points)
        assert (ground.ray_builds, ground.projection_builds) == (1, 1)
        send(1, points, fx=F * 1.1)
        assert (ground.ray_builds, ground.projection_builds) == (2, 2)


def test_camera_info_follows_remapping_and_the_lifecycle(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """-r image_raw:=/remapped/image_raw reads /remapped/camera_info; deactivate removes the ground topics,
    activate brings them back."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), ros_args=["-r", "image_raw:=/remapped/image_raw"],
                                       **{"ground.enabled": True, "ground.source": "parameters"})
        assert node._cameras[0].ground.info_topic == "/remapped/camera_info"
        topics = ("/remapped/segmentation/points", "/remapped/segmentation/ground_grid")
        wait_until(lambda: graph.node.count_subscribers("/remapped/camera_info") == 1
                   and all(graph.node.count_publishers(t) == 1 for t in topics), what="ground topics")
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        wait_until(lambda: graph.node.count_subscribers("/remapped/camera_info") == 0
                   and all(graph.node.count_publishers(t) == 0 for t in topics), what="ground topics gone")
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        wait_until(lambda: graph.node.count_subscribers("/remapped/camera_info") == 1
                   and all(graph.node.count_publishers(t) == 1 for t in topics), what="ground topics back")
