"""Build TensorRT engines from the contract's ONNX model, and cache them so a stale engine is never loaded.

    unet-build-engine models/unet_camvid.onnx --precision fp16 --max-batch 4 \
        --cache-dir ~/.cache/unet_perception/engines

An engine is tied to the exact ONNX file, the GPU model, the TensorRT version, the precision and the
optimisation profile. All of them go into the cache key; the engine is stored as ``<cache_dir>/<key>.engine``
with a ``<key>.json`` sidecar listing the fields, so a change to any of them means a different key and a
fresh build, never a "version tag does not match" at load time. The timing cache (``timing-*.cache``) and
the INT8 calibration cache (``calib-*.cache``) live in the same folder and make rebuilds fast.

The profile covers batch 1..max_batch (optimised for max_batch) at the model's own input size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_perception.backends.base import BackendError
from unet_perception.backends.cuda_memory import CudaApi, load_cuda
from unet_perception.backends.factory import PRECISIONS, BackendOptions
from unet_perception.model_contract import INPUT_NAME, ModelError, ModelInfo, read_model_info

if TYPE_CHECKING:
    import tensorrt

Log = Callable[[str], None]
DEFAULT_CALIBRATION_FRAMES = 256


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unet_perception/engines`` (``~/.cache/...``): writable wherever the model lives."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "unet_perception" / "engines"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def profile_shapes(input_hw: tuple[int, int], max_batch: int) -> dict[str, list[int]]:
    """The one optimisation profile: batch 1..max_batch, tuned for max_batch (the batcher's busy case)."""
    h, w = input_hw
    return {"min": [1, h, w, 3], "opt": [max_batch, h, w, 3], "max": [max_batch, h, w, 3]}


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; any change gives another key and so another engine file."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    precision: str
    profile: tuple[tuple[int, ...], ...]  # min, opt, max shapes of the input

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:32]

    def fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["profile"] = [list(shape) for shape in self.profile]
        return fields


def make_key(onnx_path: str | Path, input_hw: tuple[int, int], precision: str, max_batch: int,
             gpu_name: str, compute_capability: tuple[int, int], tensorrt_version: str) -> EngineKey:
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    shapes = profile_shapes(input_hw, max_batch)
    capability = f"{compute_capability[0]}.{compute_capability[1]}"
    return EngineKey(file_sha256(onnx_path), gpu_name, capability, tensorrt_version,
                     precision, tuple(tuple(shapes[k]) for k in ("min", "opt", "max")))


@dataclass(frozen=True)
class CachePlan:
    """What to do for a key: ``load`` the cached engine or ``build`` one, and why."""

    action: str
    engine: Path
    sidecar: Path
    reason: str


def engine_paths(cache_dir: Path, key: EngineKey) -> tuple[Path, Path]:
    return cache_dir / f"{key.digest}.engine", cache_dir / f"{key.digest}.json"


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_engine(cache_dir: Path, key: EngineKey) -> CachePlan:
    """Load only when both files exist and the sidecar's fields equal the key's; otherwise build, saying why."""
    engine, sidecar = engine_paths(cache_dir, key)
    wanted = key.fields()
    if engine.is_file():
        found = _read_sidecar(sidecar)
        if found is None:
            return CachePlan("build", engine, sidecar, f"cached engine '{engine}' has no readable sidecar")
        differ = [f"{k} {found.get(k)!r} != {v!r}" for k, v in wanted.items() if found.get(k) != v]
        if not differ:
            return CachePlan("load", engine, sidecar, f"cached engine '{engine}' matches")
        return CachePlan("build", engine, sidecar, "cached engine's key fields differ: " + ", ".join(differ))
    # Say what changed since the last engine built for this same ONNX file, when there is one.
    for other in sorted(cache_dir.glob("*.json")) if cache_dir.is_dir() else []:
        found = _read_sidecar(other)
        if found and found.get("onnx_sha256") == key.onnx_sha256:
            differ = [f"{k} {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v]
            return CachePlan("build", engine, sidecar,
                             f"no cached engine for this key; the one for this model ({other.stem}) differs in "
                             + ", ".join(differ))
    return CachePlan("build", engine, sidecar, f"no cached engine in '{cache_dir}' for this model")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def store_engine(plan: CachePlan, key: EngineKey, engine: bytes, build_s: float) -> None:
    """Engine first, sidecar last: a sidecar only ever describes a complete engine."""
    atomic_write(plan.engine, engine)
    atomic_write(plan.sidecar, json.dumps({**key.fields(), "build_seconds": round(build_s, 1),
                                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1).encode())


@dataclass(frozen=True)
class BuildSettings:
    """How to build one engine (what the key does not cover: workspace, caches, calibration data)."""

    onnx_path: Path
    input_hw: tuple[int, int]
    precision: str
    max_batch: int
    workspace_mb: int
    timing_cache: Path
    calibration_cache: Path
    calibration_data: str = ""
    calibration_frames: int = DEFAULT_CALIBRATION_FRAMES
    gpu_id: int = 0


EngineBuilder = Callable[[BuildSettings, CudaApi, Log], bytes]


def ensure_engine(key: EngineKey, settings: BuildSettings, cache_dir: Path, cuda: CudaApi, log: Log,
                  builder: EngineBuilder | None = None) -> Path:
    """The path of a cached engine for ``key``, building and storing it first when needed."""
    plan = plan_engine(cache_dir, key)
    if plan.action == "load":
        log(f"tensorrt: using cached engine {plan.engine}")
        return plan.engine
    h, w = settings.input_hw
    log(f"tensorrt: building a {settings.precision} engine for {settings.onnx_path.name} "
        f"(batch 1..{settings.max_batch}, "
        f"{h}x{w}) on {key.gpu_name}, TensorRT {key.tensorrt_version}, because {plan.reason}; "
        "this takes a minute or more the first time")
    start = time.perf_counter()
    engine = (builder or build_serialized_engine)(settings, cuda, log)
    elapsed = time.perf_counter() - start
    store_engine(plan, key, engine, elapsed)
    log(f"tensorrt: built {plan.engine} ({len(engine) / 1e6:.1f} MB) in {elapsed:.1f} s")
    return plan.engine


# --- INT8 calibration data -------------------------------------------------------------------------------

def calibration_frames(folder: str | Path, input_hw: tuple[int, int], limit: int) -> np.ndarray:
    """Up to ``limit`` camera frames from ``folder`` (evenly spread), RGB, resized as the node resizes them."""
    from unet_perception.image_files import IMAGE_SUFFIXES, list_image_files, read_rgb
    from unet_perception.pipeline import preprocess

    files = list_image_files(folder)
    if not files:
        raise BackendError(f"calibration data '{folder}' has no {'/'.join(IMAGE_SUFFIXES)} images; point it at a "
                           "folder of camera frames such as ../shared/data/camvid/train")
    picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(limit, len(files)))]
    frames = []
    for path in picked:
        try:
            frames.append(read_rgb(path))
        except OSError as exc:
            raise BackendError(f"calibration image '{path}' cannot be read") from exc
    return preprocess(frames, input_hw)


class CalibrationFeed:
    """Full batches of calibration frames and the calibration cache file: the calibrator's logic, without TensorRT.

    With explicit batch, TensorRT calibrates at the profile's opt shape, so every batch has exactly
    ``batch_size`` (= max_batch) frames; a last partial batch is dropped.
    """

    def __init__(self, frames: np.ndarray | None, batch_size: int, input_hw: tuple[int, int],
                 cache_path: Path) -> None:
        if frames is not None and frames.shape[1:] != (*input_hw, 3):
            raise BackendError(f"calibration frames are {list(frames.shape[1:])}, the model needs {[*input_hw, 3]}")
        self.frames = frames
        self.batch_size = batch_size
        self.item_shape = (*input_hw, 3)
        self.cache_path = cache_path

    def batches(self) -> Iterator[np.ndarray]:
        if self.frames is None:
            return
        for start in range(0, len(self.frames) - self.batch_size + 1, self.batch_size):
            yield np.ascontiguousarray(self.frames[start:start + self.batch_size])

    def read_cache(self) -> bytes | None:
        return self.cache_path.read_bytes() if self.cache_path.is_file() else None

    def write_cache(self, data: bytes) -> None:
        atomic_write(self.cache_path, data)


def calibration_feed(settings: BuildSettings, log: Log) -> CalibrationFeed:
    """The feed for an INT8 build: the cache alone when it exists, else frames from ``calibration_data``."""
    cache = settings.calibration_cache
    if cache.is_file():
        log(f"tensorrt: INT8 calibration from cache {cache} (delete it to recalibrate)")
        return CalibrationFeed(None, settings.max_batch, settings.input_hw, cache)
    if not settings.calibration_data:
        raise BackendError("precision int8 needs calibration frames: pass --calibration-data DIR (a folder of "
                           f"camera frames) or set calibration_data; no calibration cache at '{cache}'")
    frames = calibration_frames(settings.calibration_data, settings.input_hw, settings.calibration_frames)
    if len(frames) < settings.max_batch:
        raise BackendError(f"calibration data '{settings.calibration_data}' has {len(frames)} frames, fewer than "
                           f"one batch of {settings.max_batch}; add frames or lower max_batch")
    log(f"tensorrt: INT8 calibration on {len(frames)} frames from {settings.calibration_data}")
    return CalibrationFeed(frames, settings.max_batch, settings.input_hw, cache)


# --- the TensorRT build itself ---------------------------------------------------------------------------

def require_tensorrt(trt: Any) -> None:
    """tensorrt-stubs installs an empty ``tensorrt`` namespace package: importable, but not TensorRT."""
    if not hasattr(trt, "Builder"):
        raise BackendError("tensorrt Python bindings not importable (only type stubs found); install TensorRT "
                           "10 for your CUDA version (pip install tensorrt) or use backend onnxruntime")


@contextmanager
def int8_calibrator(feed: CalibrationFeed, cuda: CudaApi) -> Iterator[tensorrt.IInt8EntropyCalibrator2]:
    """An entropy calibrator (v2) copying each batch of ``feed`` to one device buffer; frees it on exit."""
    import tensorrt as trt

    stream = cuda.create_stream()
    nbytes = feed.batch_size * int(np.prod(feed.item_shape))
    device = cuda.alloc_device(nbytes, f"calibration input '{INPUT_NAME}'")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = feed.batches()

        def get_batch_size(self) -> int:
            return feed.batch_size

        def get_batch(self, names: list[str]) -> list[int]:
            batch = next(self.batches, None)
            if batch is None:
                return []  # no more data: calibration ends
            cuda.copy_to_device(device, batch, nbytes, stream, f"calibration input '{INPUT_NAME}'")
            cuda.synchronize(stream)
            return [device]

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            feed.write_cache(bytes(cache))

    try:
        yield EntropyCalibrator()
    finally:
        cuda.free_device(device)
        cuda.destroy_stream(stream)


def parse_onnx(trt_logger: tensorrt.ILogger, builder: tensorrt.Builder, path: Path) -> tensorrt.INetworkDefinition:
    """Parse the ONNX file into a network; raises BackendError listing every parser error."""
    import tensorrt as trt

    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node '{err.node_name()}' ({err.node_operator()}): {err.desc()}")
        raise BackendError(f"TensorRT {trt.__version__} cannot parse '{path}': " + "; ".join(errors or ["no detail"])
                           + ". Re-export with unet-export (opset 17) or use backend onnxruntime")
    return network


def progress_monitor(log: Log, min_interval_s: float = 10.0) -> tensorrt.IProgressMonitor:
    """Logs the builder's top-level phases, at most one line per ``min_interval_s`` (builds take minutes)."""
    import tensorrt as trt

    class Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.last = 0.0

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            now = time.perf_counter()
            if parent_phase is None and now - self.last >= min_interval_s:
                self.last = now
                log(f"tensorrt: build phase '{phase_name}' ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Progress()


def build_serialized_engine(settings: BuildSettings, cuda: CudaApi, log: Log) -> bytes:
    """Parse, configure (precision, workspace, profile, timing cache, calibrator) and build; returns the plan."""
    import tensorrt as trt

    require_tensorrt(trt)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    with cuda.use_device(settings.gpu_id):
        builder = trt.Builder(trt_logger)
        network = parse_onnx(trt_logger, builder, settings.onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
        config.progress_monitor = progress_monitor(log)

        shapes = profile_shapes(settings.input_hw, settings.max_batch)
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
        if config.add_optimization_profile(profile) < 0:
            raise BackendError(f"TensorRT rejected the optimisation profile {shapes} for input '{INPUT_NAME}'")

        stack = ExitStack()
        if settings.precision in ("fp16", "int8"):
            if not builder.platform_has_fast_fp16:
                log(f"tensorrt: warning: this GPU has no fast FP16; {settings.precision} may be slower than fp32")
            config.set_flag(trt.BuilderFlag.FP16)  # int8 layers fall back to fp16, not fp32
        if settings.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = stack.enter_context(int8_calibrator(calibration_feed(settings, log), cuda))
            if not config.set_calibration_profile(profile):
                raise BackendError("TensorRT rejected the calibration profile")

        timing = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(timing)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"tensorrt: timing cache {settings.timing_cache} is from another GPU or TensorRT; starting a new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        with stack:
            plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT {trt.__version__} failed to build an engine from '{settings.onnx_path}' "
                               f"({settings.precision}); see the TensorRT messages above. Try --precision fp32, a "
                               "larger --workspace-mb, or backend onnxruntime")
        atomic_write(settings.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(plan))


def tensorrt_version() -> str:
    import tensorrt as trt

    require_tensorrt(trt)
    return str(trt.__version__)


def engine_for(info: ModelInfo, options: BackendOptions, cuda: CudaApi, log: Log,
               builder: EngineBuilder | None = None, version: str | None = None) -> tuple[Path, EngineKey]:
    """The cached (or freshly built) engine for ``info`` under ``options``, and its key."""
    cache_dir = Path(options.engine_cache_dir).expanduser() if options.engine_cache_dir else default_cache_dir()
    version = version or tensorrt_version()
    gpu = cuda.device_name(options.gpu_id)
    cc = cuda.compute_capability(options.gpu_id)
    key = make_key(info.path, info.input_hw, options.precision, options.max_batch, gpu, cc, version)
    machine = hashlib.sha256(f"{gpu}|{cc}|{version}".encode()).hexdigest()[:16]
    settings = BuildSettings(info.path, info.input_hw, options.precision, options.max_batch, options.workspace_mb,
                             timing_cache=cache_dir / f"timing-{machine}.cache",
                             calibration_cache=cache_dir / f"calib-{key.onnx_sha256[:16]}-{key.profile[1][0]}.cache",
                             calibration_data=options.calibration_data, gpu_id=options.gpu_id)
    return ensure_engine(key, settings, cache_dir, cuda, log, builder), key


def build_only(model: str | Path, options: BackendOptions, log: Log | None = None) -> Path:
    """Build (or find) the engine for ``model`` and return its path: for image builds, CI and the node's build_only."""
    options.validate()
    log = log or logging.getLogger("unet_perception").info
    version = tensorrt_version()  # first: "no TensorRT" is the likelier and clearer error than "no CUDA"
    return engine_for(read_model_info(model), options, load_cuda(), log, version=version)[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-build-engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="ONNX model following the contract (from unet-export)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the engine accepts (the node's max_batch)")
    p.add_argument("--cache-dir", default="", help=f"engine cache folder (default: {default_cache_dir()})")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit in MiB")
    p.add_argument("--gpu-id", type=int, default=0)
    p.add_argument("--calibration-data", default="",
                   help="int8: folder of camera frames for the entropy calibrator (e.g. ../shared/data/camvid/train)")
    p.add_argument("--build-only", action="store_true",
                   help="build or find the engine and exit without a test inference (for image builds and CI)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = BackendOptions(max_batch=args.max_batch, precision=args.precision, engine_cache_dir=args.cache_dir,
                             workspace_mb=args.workspace_mb, gpu_id=args.gpu_id,
                             calibration_data=args.calibration_data)
    try:
        path = build_only(args.model, options, print)
        if not args.build_only:
            from unet_perception.backends.tensorrt import TensorRTBackend

            info = read_model_info(args.model)
            with TensorRTBackend(info, options) as backend:
                h, w = info.input_hw
                labels = backend.infer(np.zeros((options.max_batch, h, w, 3), np.uint8))
            print(f"test inference on {backend.device}: batch {options.max_batch} -> labels {list(labels.shape)}")
    except (BackendError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
