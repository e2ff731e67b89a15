"""Ground projection (pure units): a synthetic camera of known K, height, pitch and roll over flat ground.

Every reference here is computed in the test itself: the camera's axes are built geometrically from the
documented conventions (not with ground.py's matrices), points come from the closed-form ray-plane
intersection, distorted pixels from cv2.projectPoints / cv2.fisheye.projectPoints.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo

from unet_perception.camera_model import CameraInfoError, CameraModel, check_size
from unet_perception.ground import GridSpec, GroundError, GroundPose, GroundProjection, TfGround, class_kinds

W, H, FX, FY, CX, CY = 640, 480, 500.0, 520.0, 321.5, 243.0
HEIGHT, PITCH, ROLL = 1.4, 0.12, 0.05
MAX_PIXELS = 4096 * 4096


def camera_info(d: tuple[float, ...] = (), model: str = "plumb_bob", k: tuple[float, ...] | None = None,
                width: int = W, height: int = H) -> CameraInfo:
    msg = CameraInfo(width=width, height=height, distortion_model=model)
    msg.k = list(k or (FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0))
    msg.d = list(d or (0.0,) * 5)
    return msg


def model_of(msg: CameraInfo) -> CameraModel:
    return CameraModel.from_camera_info(msg, MAX_PIXELS)


def camera_axes(pitch: float, roll: float) -> np.ndarray:
    """Columns: the optical x (right), y (down), z (forward) axes in the ground frame (x fwd, y left, z up),
    built from the definitions: pitch tilts the forward axis down, roll turns the right axis clockwise (towards
    down) as seen from behind."""
    forward = np.array([math.cos(pitch), 0.0, -math.sin(pitch)])
    down_level = np.array([-math.sin(pitch), 0.0, -math.cos(pitch)])
    right_level = np.array([0.0, -1.0, 0.0])
    right = math.cos(roll) * right_level + math.sin(roll) * down_level
    down = -math.sin(roll) * right_level + math.cos(roll) * down_level
    return np.stack([right, down, forward], axis=1)


def analytic_points(u: np.ndarray, v: np.ndarray, height: float, pitch: float, roll: float) -> np.ndarray:
    """Closed-form ray-plane intersection for undistorted pixels (u, v): points in the optical frame, NaN
    where the ray does not descend (at or above the horizon)."""
    axes = camera_axes(pitch, roll)
    rays = np.stack([(u - CX) / FX, (v - CY) / FY, np.ones_like(u, dtype=np.float64)], axis=-1)
    descent = -(rays @ axes.T)[..., 2]  # how fast the ray goes down in the ground frame
    with np.errstate(divide="ignore"):
        t = np.where(descent > 0, height / descent, np.nan)
    return rays * t[..., None]


def projection(msg: CameraInfo, stride: int = 1, pose: GroundPose | None = None, max_range: float = 40.0,
               grid: GridSpec | None = None) -> GroundProjection:
    return GroundProjection(model_of(msg), stride, pose or GroundPose.from_angles(HEIGHT, PITCH, ROLL),
                            max_range, grid or GridSpec())


def assert_close_relative(got: np.ndarray, want: np.ndarray, rel: float = 0.005) -> None:
    err = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert float(err.max()) < rel, f"worst relative error {float(err.max()):.4%}"


def test_points_match_the_analytic_ground_up_to_10_m() -> None:
    proj = projection(camera_info())
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    want = analytic_points(u, v, HEIGHT, PITCH, ROLL)
    assert proj.points.shape == (H, W, 3) and proj.points.dtype == np.float32
    near = np.isfinite(want).all(axis=-1) & (np.linalg.norm(np.nan_to_num(want), axis=-1) <= 10.0)
    assert near.sum() > 50_000  # most of the lower image sees the ground within 10 m
    assert_close_relative(proj.points[near], want[near])
    # every point is on the ground: its height in the ground frame is 0
    ground_z = proj.points[near].astype(np.float64) @ camera_axes(PITCH, ROLL).T[:, 2] + HEIGHT
    assert np.abs(ground_z).max() < 1e-4


def test_centre_column_distance_is_h_over_tan() -> None:
    """Without roll, the pixel (cx, v) sees the ground at h / tan(pitch + atan((v - cy) / fy)) ahead."""
    proj = projection(camera_info(k=(FX, 0.0, 320.0, 0.0, FY, CY, 0.0, 0.0, 1.0)),
                      pose=GroundPose.from_angles(HEIGHT, PITCH, 0.0))
    for v in (260, 300, 400, 479):
        below = PITCH + math.atan((v - CY) / FY)
        ahead = HEIGHT / math.tan(below)
        x, y, z = proj.points[v, 320].astype(np.float64)
        assert x == pytest.approx(0.0, abs=1e-6)
        assert math.hypot(y, z) * math.cos(below) == pytest.approx(ahead, rel=1e-4)  # horizontal distance
        assert math.hypot(y, z) * math.sin(below) == pytest.approx(HEIGHT, rel=1e-4)  # drop to the ground


def test_nan_above_the_horizon_and_beyond_max_range() -> None:
    proj = projection(camera_info(), max_range=25.0)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    want = analytic_points(u, v, HEIGHT, PITCH, ROLL)
    above = ~np.isfinite(want).all(axis=-1)
    assert above.sum() > 10_000 and np.isnan(proj.points[above]).all()
    far = ~above & (np.linalg.norm(np.nan_to_num(want), axis=-1) > 25.0 * 1.001)
    assert far.sum() > 100 and np.isnan(proj.points[far]).all()
    inside = ~above & (np.linalg.norm(np.nan_to_num(want), axis=-1) < 25.0 * 0.999)
    assert np.isfinite(proj.points[inside]).all()
    # roll tilts the horizon: the top row's left end sees the ground when the right end does not
    rolled = projection(camera_info(), pose=GroundPose.from_angles(HEIGHT, 0.0, 0.3), max_range=1e6)
    row = int(CY) - 40
    assert np.isfinite(rolled.points[row, 0]).all() != np.isfinite(rolled.points[row, W - 1]).all()
    assert np.isfinite(rolled.points[row, W - 1]).all() == bool(np.isfinite(analytic_points(
        np.array(W - 1), np.array(row), HEIGHT, 0.0, 0.3)).all())


@pytest.mark.parametrize("stride", [2, 3, 7])
def test_stride_samples_pixel_c_times_stride(stride: int) -> None:
    proj = projection(camera_info(), stride=stride)
    rows, cols = math.ceil(H / stride), math.ceil(W / stride)
    assert proj.points.shape == (rows, cols, 3)
    u, v = np.meshgrid(np.arange(cols) * stride, np.arange(rows) * stride)
    want = analytic_points(u, v, HEIGHT, PITCH, ROLL)
    near = np.isfinite(want).all(axis=-1) & (np.linalg.norm(np.nan_to_num(want), axis=-1) <= 10.0)
    assert_close_relative(proj.points[near], want[near])


DISTORTIONS = [
    ("plumb_bob", (-0.28, 0.09, 0.0012, -0.0008, -0.015)),
    ("rational_polynomial", (0.6, -0.2, 0.001, 0.0005, 0.05, 0.9, -0.1, 0.08)),
    ("equidistant", (0.08, -0.03, 0.01, -0.002)),
]


def project(model: str, d: tuple[float, ...], points: np.ndarray) -> np.ndarray:
    """OpenCV's own projection of optical-frame points to (distorted) pixels."""
    k = np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1]], np.float64)
    obj = points.reshape(-1, 1, 3).astype(np.float64)
    zero = np.zeros(3)
    if model == "equidistant":
        px, _ = cv2.fisheye.projectPoints(obj, zero, zero, k, np.array(d))
    else:
        px, _ = cv2.projectPoints(obj, zero, zero, k, np.array(d))
    return px.reshape(-1, 2)


@pytest.mark.parametrize(("model", "d"), DISTORTIONS)
def test_undistortion_against_opencv_projection(model: str, d: tuple[float, ...]) -> None:
    """Known ground points, distorted into pixels by OpenCV; the cloud there is those points."""
    proj = projection(camera_info(d, model))
    axes = camera_axes(PITCH, ROLL)
    xs, ys = np.meshgrid(np.linspace(3.0, 10.0, 8), np.linspace(-2.0, 2.0, 9))
    ground = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], axis=1)
    optical = (ground - [0.0, 0.0, HEIGHT]) @ axes  # ground frame -> optical frame
    pixels = project(model, d, optical)
    inside = (pixels[:, 0] >= 0) & (pixels[:, 0] < W - 1) & (pixels[:, 1] >= 0) & (pixels[:, 1] < H - 1)
    assert inside.sum() > 40
    got = np.array([bilinear(proj.points, u, v) for u, v in pixels[inside]])
    assert_close_relative(got, optical[inside])
    # and each sampled point projects back onto its own pixel
    r, c = np.nonzero(np.isfinite(proj.points).all(axis=-1))
    pick = np.linspace(0, r.size - 1, 500).astype(int)
    back = project(model, d, proj.points[r[pick], c[pick]])
    np.testing.assert_allclose(back, np.stack([c[pick], r[pick]], axis=1), atol=0.01)


def bilinear(points: np.ndarray, u: float, v: float) -> np.ndarray:
    c0, r0 = int(u), int(v)
    a, b = u - c0, v - r0
    p = points.astype(np.float64)
    return ((1 - a) * (1 - b) * p[r0, c0] + a * (1 - b) * p[r0, c0 + 1] + (1 - a) * b * p[r0 + 1, c0]
            + a * b * p[r0 + 1, c0 + 1])


ROAD, WALL, SKY = 3, 7, 0  # CamVid ids: Road, Fence, Sky
NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
         "Bicyclist")


def render_scene(half_width: float) -> np.ndarray:
    """Labels of a flat scene: road where |y| < half_width on the ground, fence beside it, sky above."""
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    optical = analytic_points(u, v, HEIGHT, PITCH, ROLL)
    ground = optical @ camera_axes(PITCH, ROLL).T
    labels = np.full((H, W), SKY, np.uint8)
    seen = np.isfinite(ground).all(axis=-1)
    labels[seen] = np.where(np.abs(ground[seen][:, 1]) < half_width, ROAD, WALL)
    return labels


@pytest.mark.parametrize("stride", [1, 3])
def test_grid_cells_of_a_rendered_road(stride: int) -> None:
    spec = GridSpec(resolution=0.5, size_x=40.0, size_y=20.0, origin_x=-5.0, origin_y=-10.0)
    proj = projection(camera_info(), stride=stride, grid=spec, max_range=30.0)
    cells = proj.grid(render_scene(half_width=2.0), class_kinds(NAMES, [], []))
    assert cells.shape == (40, 80) and cells.dtype == np.int8  # rows along y, columns along x
    x = spec.origin_x + (np.arange(spec.cols) + 0.5) * spec.resolution
    y = spec.origin_y + (np.arange(spec.rows) + 0.5) * spec.resolution
    gx, gy = np.meshgrid(x, y)
    near = (gx > 4.0) & (gx < 10.0)
    assert (cells[near & (np.abs(gy) < 1.5)] == 0).all()          # road ahead
    beside = near & (np.abs(gy) > 2.5) & (np.abs(gy) < 0.4 * gx)  # fence, inside the field of view
    assert beside.sum() > 20 and (cells[beside] == 100).all()
    assert (cells[gx < 0] == -1).all()                           # behind the camera: no pixel
    assert (cells[gx > 31.0] == -1).all()                        # beyond max_range
    assert (cells[np.abs(gy) > 0.8 * gx + 1.0] == -1).all()       # outside the field of view
    # left in the image is +y in the grid: a road only on the camera's left frees only +y cells
    left = render_scene(half_width=2.0)
    u = np.arange(W)[None, :].repeat(H, 0)
    left[(left == ROAD) & (u > W // 2 + 40)] = WALL
    cells_left = proj.grid(left, class_kinds(NAMES, [], []))
    assert (cells_left[near & (gy > 0.3) & (gy < 1.5)] == 0).all()
    assert (cells_left[near & (gy < -0.8) & (gy > -1.5)] == 100).all()


def test_grid_majority_rule() -> None:
    """A cell is free or obstacle only when more than half its pixels are: 40% road, 20% car and 40% of a class
    in neither list is unknown, not free."""
    spec = GridSpec(resolution=0.5, size_x=20.0, size_y=20.0, origin_x=0.0, origin_y=-10.0)
    proj = projection(camera_info(), grid=spec)
    labels = render_scene(half_width=50.0)  # road everywhere on the ground
    kinds = class_kinds(NAMES, ["Road"], ["Car"])
    seen = proj.grid(labels, kinds) == 0
    assert seen.sum() > 100
    u = np.arange(W)[None, :].repeat(H, 0)
    mixed = labels.copy()
    mixed[(labels == ROAD) & (u % 5 == 2)] = NAMES.index("Car")
    mixed[(labels == ROAD) & (u % 5 >= 3)] = NAMES.index("Pavement")
    cells = proj.grid(mixed, kinds)
    many = proj.grid(labels, kinds) == 0
    assert (cells[many] == -1).mean() > 0.9  # far cells of one or two pixels may still have a majority
    mostly_cars = mixed.copy()
    mostly_cars[(labels == ROAD) & (u % 5 != 0)] = NAMES.index("Car")  # 80% car
    assert (proj.grid(mostly_cars, kinds)[many] == 100).mean() > 0.9
    none_free = proj.grid(labels, class_kinds(NAMES, ["Pavement"], ["Car"]))  # road neither free nor obstacle
    assert (none_free == -1).all()


def test_class_kinds_defaults_and_refusals() -> None:
    lut = class_kinds(NAMES, [], [])
    assert lut[ROAD] == 1 and lut[WALL] == 2 and lut[255] == 0 and (lut[:11] > 0).all()
    assert class_kinds(["unlabeled", "road", "car"], [], [])[1] == 1  # Cityscapes spelling
    with pytest.raises(ValueError, match=r"\['Raod'\], which the model does not have"):
        class_kinds(NAMES, ["Raod"], [])
    with pytest.raises(ValueError, match="no class named Road or road"):
        class_kinds(["grass", "tree"], [], [])
    with pytest.raises(ValueError, match="in both"):
        class_kinds(NAMES, ["Road"], ["Road", "Car"])


def test_grid_refuses_labels_of_another_size() -> None:
    with pytest.raises(ValueError, match="labels are 320x240"):
        projection(camera_info()).grid(np.zeros((240, 320), np.uint8), class_kinds(NAMES, [], []))


@pytest.mark.parametrize(("msg", "reason"), [
    (camera_info(k=(0.0, 0, CX, 0, FY, CY, 0, 0, 1)), "focal lengths"),
    (camera_info(k=(FX, 0, CX, 0, -FY, CY, 0, 0, 1)), "focal lengths"),
    (camera_info(k=(math.nan, 0, CX, 0, FY, CY, 0, 0, 1)), "not 9 finite"),
    (camera_info(k=(FX, 0, CX, 0, FY, math.inf, 0, 0, 1)), "not 9 finite"),
    (camera_info(k=(FX, 0.5, CX, 0, FY, CY, 0, 0, 1)), "skew"),
    (camera_info(d=(0.1, 0.0, 0.0, 0.0)), "needs 5 coefficients"),
    (camera_info(d=(0.1, math.nan, 0.0, 0.0, 0.0)), "NaN"),
    (camera_info(d=(0.1, 0.0, 0.0, 0.0, 0.0), model="kannala"), "is not one of"),
    (camera_info(width=0), "size 0x480"),
    (camera_info(width=100_000, height=100_000), "larger than max_image_pixels"),
])
def test_bad_camera_info_is_refused(msg: CameraInfo, reason: str) -> None:
    with pytest.raises(CameraInfoError, match=reason):
        model_of(msg)


def test_uncalibrated_distortion_free_info_is_accepted_and_size_checked() -> None:
    model = model_of(camera_info(d=(0.0,) * 5, model=""))
    check_size(model, (W, H))
    with pytest.raises(CameraInfoError, match="frame is 320x240 but camera_info says 640x480"):
        check_size(model, (320, 240))
    binned = camera_info()
    binned.binning_x = 2
    with pytest.raises(CameraInfoError, match="binning"):
        model_of(binned)


@pytest.mark.parametrize(("height", "pitch", "roll", "reason"), [
    (0.0, 0.1, 0.0, "camera_height is 0.0"), (-1.0, 0.1, 0.0, "> 0"), (math.nan, 0.1, 0.0, "> 0"),
    (1.0, 1.6, 0.0, "camera_pitch"), (1.0, 0.0, -2.0, "camera_roll"), (1.0, math.inf, 0.0, "camera_pitch"),
])
def test_bad_pose_parameters_are_refused(height: float, pitch: float, roll: float, reason: str) -> None:
    with pytest.raises(GroundError, match=reason):
        GroundPose.from_angles(height, pitch, roll)


def test_grid_spec_is_bounded() -> None:
    with pytest.raises(GroundError, match="larger than"):
        GridSpec(resolution=0.001, size_x=1000.0, size_y=1000.0)
    with pytest.raises(GroundError, match="finite and > 0"):
        GridSpec(resolution=0.0)


def quaternion(axes: np.ndarray) -> tuple[float, float, float, float]:
    """x, y, z, w of a rotation matrix, through OpenCV's axis-angle (independent of ground.py's formula)."""
    rvec, _ = cv2.Rodrigues(axes)
    angle = float(np.linalg.norm(rvec))
    axis = rvec.ravel() / angle
    return (*(axis * math.sin(angle / 2)), math.cos(angle / 2))  # type: ignore[return-value]


class FakeBuffer:
    """tf2_ros.Buffer's lookup_transform as the seam: a fixed base_link <- camera_optical transform."""

    def __init__(self, translation: tuple[float, float, float], rotation: tuple[float, ...]) -> None:
        self.translation, self.rotation = translation, rotation
        self.calls: list[tuple[str, str, object]] = []

    def lookup_transform(self, target: str, source: str, time: object) -> SimpleNamespace:
        self.calls.append((target, source, time))
        if source != "camera_optical":
            raise LookupError(f'"{source}" passed to lookupTransform argument source_frame does not exist')
        t = SimpleNamespace(**dict(zip("xyz", self.translation, strict=True)))
        q = SimpleNamespace(**dict(zip("xyzw", self.rotation, strict=True)))
        return SimpleNamespace(transform=SimpleNamespace(translation=t, rotation=q))


def test_tf_source_places_the_ground_from_a_transform() -> None:
    """A camera 1.5 m ahead of base_link: same points as from the angles, grid shifted by 1.5 m."""
    buffer = FakeBuffer((1.5, 0.0, HEIGHT), quaternion(camera_axes(PITCH, ROLL)))
    latest = object()
    pose = TfGround(buffer, "base_link", latest).pose("camera_optical")
    assert buffer.calls == [("base_link", "camera_optical", latest)]
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    want = analytic_points(u, v, HEIGHT, PITCH, ROLL)
    spec = GridSpec(resolution=0.5, size_x=20.0, size_y=20.0, origin_x=0.0, origin_y=-10.0)
    proj = projection(camera_info(), pose=pose, grid=spec)
    near = np.isfinite(want).all(axis=-1) & (np.linalg.norm(np.nan_to_num(want), axis=-1) <= 10.0)
    assert_close_relative(proj.points[near], want[near])
    by_angles = projection(camera_info(), grid=spec).grid(render_scene(2.0), class_kinds(NAMES, [], []))
    by_tf = proj.grid(render_scene(2.0), class_kinds(NAMES, [], []))
    np.testing.assert_array_equal(by_tf[:, 3:], by_angles[:, :-3])  # 1.5 m = 3 cells further along x
    with pytest.raises(GroundError, match="no transform base_link <- other_optical: LookupError"):
        TfGround(buffer, "base_link", latest).pose("other_optical")
    with pytest.raises(GroundError, match="no header.frame_id"):
        TfGround(buffer, "base_link", latest).pose("")
    with pytest.raises(GroundError, match="above the ground"):
        TfGround(FakeBuffer((0.0, 0.0, -0.2), (0.0, 0.0, 0.0, 1.0)), "base_link", latest).pose("camera_optical")


def test_grid_uses_exactly_the_sampled_pixels() -> None:
    """At stride 3 only pixels (3c, 3r) count: road there and fence everywhere else gives free cells only."""
    proj = projection(camera_info(), stride=3, grid=GridSpec(resolution=0.5))
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    labels = np.where((u % 3 == 0) & (v % 3 == 0), ROAD, WALL).astype(np.uint8)
    cells = proj.grid(labels, class_kinds(NAMES, [], []))
    assert (cells == 0).sum() > 1000 and not (cells == 100).any()


def test_documented_static_transform_gives_the_parameters_pose() -> None:
    """docs/node.md: static_transform_publisher --z h --roll (-pi/2 - pitch) --yaw -pi/2 is the parameters pose
    (tf2's setRPY: fixed axes, R = Rz(yaw) Ry(pitch) Rx(roll), turned into a quaternion here)."""
    roll, yaw = -math.pi / 2 - PITCH, -math.pi / 2
    cr, sr, cy, sy = math.cos(roll / 2), math.sin(roll / 2), math.cos(yaw / 2), math.sin(yaw / 2)
    q = (sr * cy, sr * sy, cr * sy, cr * cy)  # pitch 0: q = qz(yaw) * qx(roll)
    pose = TfGround(FakeBuffer((0.0, 0.0, HEIGHT), q), "base_link", None).pose("camera_optical")
    want = GroundPose.from_angles(HEIGHT, PITCH, 0.0)
    np.testing.assert_allclose(pose.rotation, want.rotation, atol=1e-12)
    np.testing.assert_allclose(pose.rotation, camera_axes(PITCH, 0.0), atol=1e-12)
