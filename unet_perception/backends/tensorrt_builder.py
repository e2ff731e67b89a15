"""Build strongly typed TensorRT engines from the per-precision ONNX file, once, into the engine cache.

One path for TensorRT 10.x and 11.x: the network is created strongly typed (``STRONGLY_TYPED`` on 10.x, the only
mode on 11.x), so every tensor's type comes from the ONNX file (``precision_onnx``: fp32, the fp16 conversion or
the int8 Q/DQ model). No FP16/INT8 builder flags, no calibrator, no ``platform_has_fast_fp16``: 11.x removed them.
fp32 engines clear ``BuilderFlag.TF32`` so their labels match ONNX Runtime's float32 ones.

The profile covers batch 1..max_batch (optimised for max_batch) at the model's own input size. The timing cache
(``timing-<gpu+trt>.cache``) lives in the engine cache folder and makes rebuilds fast. The cache folder and every
file read from it pass ``cache_trust`` first (docs/tensorrt.md, "Who may write the cache").
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unet_perception.backends.base import BackendError
from unet_perception.backends.cache_trust import UntrustedFile, atomic_write, cache_folder, read_trusted, \
    require_writable
from unet_perception.backends.cuda_memory import CudaApi, load_cuda
from unet_perception.backends.engine_cache import EngineKey, cache_dir_for, make_key, plan_engine, profile_shapes, \
    store_engine
from unet_perception.backends.factory import BackendOptions
from unet_perception.backends.precision_onnx import onnx_for_precision
from unet_perception.model_contract import INPUT_NAME, ModelInfo, read_model_info
from unet_perception.onnx_rules import check_tensorrt_rules

if TYPE_CHECKING:
    import tensorrt

Log = Callable[[str], None]
SUPPORTED_MAJORS = (10, 11)


@dataclass(frozen=True)
class BuildSettings:
    """How to build one engine (what the key does not cover: workspace, timing cache, device)."""

    onnx_path: Path            # the per-precision ONNX file
    input_hw: tuple[int, int]
    precision: str
    max_batch: int
    workspace_mb: int
    timing_cache: Path
    gpu_id: int = 0


EngineBuilder = Callable[[BuildSettings, CudaApi, Log], bytes]


def require_tensorrt(trt: Any) -> str:
    """The TensorRT version; BackendError when ``trt`` is only the stubs or a version this code does not know."""
    if not hasattr(trt, "Builder"):  # tensorrt-stubs installs an importable, empty ``tensorrt`` package
        raise BackendError("tensorrt Python bindings not importable (only type stubs found); install TensorRT "
                           "10 or 11 for your CUDA (pip install -r requirements/gpu.txt) or use backend onnxruntime")
    version = str(trt.__version__)
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major not in SUPPORTED_MAJORS:
        raise BackendError(f"TensorRT {version} is not supported; this package builds with TensorRT "
                           f"{' or '.join(f'{m}.x' for m in SUPPORTED_MAJORS)}")
    return version


def tensorrt_version() -> str:
    import tensorrt as trt

    return require_tensorrt(trt)


def network_flags() -> int:
    """``create_network`` flags: strongly typed. The member's value differs: 1 in 10.x (EXPLICIT_BATCH is 0), 0 in
    11.x (deprecated and ignored there, strong typing being the only mode; EXPLICIT_BATCH is gone), so it is
    always looked up by name, never spelt as a number; a later version that drops it gets 0 (the default)."""
    import tensorrt as trt

    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if strongly_typed is None else 1 << int(strongly_typed)


class TrtLog:
    """A TensorRT logger that forwards warnings and errors to ``log`` and keeps the errors for exceptions."""

    def __init__(self, log: Log) -> None:
        import tensorrt as trt

        severity = trt.ILogger.Severity
        errors: list[str] = []

        class Forward(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, level: tensorrt.ILogger.Severity, msg: str) -> None:
                if level in (severity.INTERNAL_ERROR, severity.ERROR):
                    errors.append(msg)
                    log(f"tensorrt: error: {msg}")
                elif level == severity.WARNING:
                    log(f"tensorrt: warning: {msg}")

        self.logger = Forward()
        self.errors = errors

    def reason(self) -> str:
        return "; ".join(self.errors[-3:]) or "TensorRT logged no error"


def construct(what: str, factory: Callable[[Any], Any], trt_log: TrtLog, gpu_id: int) -> Any:
    """``trt.Builder``/``trt.Runtime``: pybind raises TypeError when the C++ factory returns null (CUDA init failed)."""
    try:
        made = factory(trt_log.logger)
    except (TypeError, RuntimeError) as exc:
        made, detail = None, f"{type(exc).__name__}: {exc}"
    else:
        detail = "returned None"
    if made is None:
        raise BackendError(f"TensorRT could not create its {what} on cuda:{gpu_id} ({detail}); TensorRT said: "
                           f"{trt_log.reason()}. Usually the CUDA driver is too old for this TensorRT/CUDA build "
                           "(see requirements/gpu.txt) or the GPU is not usable (nvidia-smi)")
    return made


def parse_onnx(trt_log: TrtLog, builder: tensorrt.Builder,
               path: Path) -> tuple[tensorrt.INetworkDefinition, tensorrt.OnnxParser]:
    """Parse the ONNX file into a strongly typed network; raises BackendError listing every parser error.

    Returns the parser too: it owns the weights the network points at, so it must live until the build is done.
    """
    import tensorrt as trt

    network = builder.create_network(network_flags())
    parser = trt.OnnxParser(network, trt_log.logger)
    if not parser.parse_from_file(str(path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            errors.append(f"node '{err.node_name()}' ({err.node_operator()}): {err.desc()}")
        raise BackendError(f"TensorRT {trt.__version__} cannot parse '{path}': " + "; ".join(errors or ["no detail"])
                           + ". Re-export with unet-export or use backend onnxruntime")
    return network, parser


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

    progress: tensorrt.IProgressMonitor = Progress()
    return progress


def configure(builder: tensorrt.Builder, settings: BuildSettings, log: Log,
              monitor: tensorrt.IProgressMonitor) -> tensorrt.IBuilderConfig:
    """Workspace, TF32 (off for fp32), the one profile and the timing cache; no precision flags."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    config.progress_monitor = monitor
    if settings.precision == "fp32":  # TF32 rounds inputs to 10 bits: labels would drift from fp32
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        else:
            log(f"tensorrt: warning: TensorRT {trt.__version__} has no BuilderFlag.TF32 to clear; fp32 labels may "
                "differ from ONNX Runtime's a little more")
    shapes = profile_shapes(settings.input_hw, settings.max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, trt.Dims(shapes["min"]), trt.Dims(shapes["opt"]), trt.Dims(shapes["max"]))
    if config.add_optimization_profile(profile) < 0:
        raise BackendError(f"TensorRT rejected the optimisation profile {shapes} for input '{INPUT_NAME}'")
    attach_timing_cache(config, settings.timing_cache, log)
    return config


def read_timing_cache(path: Path, log: Log) -> bytes:
    """The timing cache's bytes, b"" when there is none or it is not trusted (``cache_trust``: never opened)."""
    try:
        return read_trusted(path)
    except FileNotFoundError:
        return b""
    except (OSError, UntrustedFile) as exc:
        log(f"tensorrt: warning: not using timing cache: {exc}; starting a new one")
        return b""


def _set_timing_cache(config: tensorrt.IBuilderConfig, data: bytes) -> bool:
    """Whether TensorRT took a timing cache made from ``data``: ``create_timing_cache`` returns None for bytes it
    cannot read (a truncated or foreign file), and ``set_timing_cache`` returns False on a mismatch (another GPU or
    TensorRT)."""
    cache = config.create_timing_cache(data)
    return cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)


def attach_timing_cache(config: tensorrt.IBuilderConfig, path: Path, log: Log) -> bool:
    """Attach the saved timing cache, else a new one; TensorRT may refuse even a new cache: then the build goes on
    without one, and says so."""
    timing = read_timing_cache(path, log)
    if timing and _set_timing_cache(config, timing):
        return True
    if timing:
        log(f"tensorrt: timing cache {path} is unreadable or from another GPU or TensorRT; starting a new one")
    if _set_timing_cache(config, b""):
        return True
    log("tensorrt: warning: TensorRT refused a new timing cache (set_timing_cache returned False); building without "
        "one, so this build and later ones time every layer afresh")
    return False


def build_serialized_engine(settings: BuildSettings, cuda: CudaApi, log: Log) -> bytes:
    """Parse (strongly typed), configure and build; returns the serialized engine."""
    import tensorrt as trt

    require_tensorrt(trt)
    # TensorRT keeps raw pointers to the logger and the monitor, and the network to the parser's weights: all
    # of them stay referenced here until the engine is built
    trt_log = TrtLog(log)
    monitor = progress_monitor(log)
    with cuda.use_device(settings.gpu_id):  # a CUDA driver problem surfaces here as a CudaError naming it
        builder: tensorrt.Builder = construct("Builder", trt.Builder, trt_log, settings.gpu_id)
        network, parser = parse_onnx(trt_log, builder, settings.onnx_path)
        config = configure(builder, settings, log, monitor)
        plan = builder.build_serialized_network(network, config)
        del parser  # only now: the weights were copied into the plan
        if plan is None:
            raise BackendError(f"TensorRT {trt.__version__} failed to build an engine from '{settings.onnx_path}' "
                               f"({settings.precision}): {trt_log.reason()}. Try precision fp32, a larger "
                               "workspace_mb, or backend onnxruntime")
        timing = config.get_timing_cache()
        if timing is not None:  # None when no cache could be attached
            atomic_write(settings.timing_cache, bytes(memoryview(timing.serialize())))
        return bytes(memoryview(plan))


def ensure_engine(key: EngineKey, settings: BuildSettings, cache_dir: Path, cuda: CudaApi, log: Log,
                  builder: EngineBuilder | None = None) -> Path:
    """The path of a cached engine for ``key``, building and storing it first when needed.

    Before a build, the per-precision ONNX file is checked against TensorRT's rules (``onnx_rules``)."""
    plan = plan_engine(cache_dir, key)
    if plan.action == "load":
        log(f"tensorrt: using cached engine {plan.engine}")
        return plan.engine
    # Checked only before a build: a cached engine was built from this very file (its hash is in the key), so
    # the check passed then; a start-up that loads the engine skips re-parsing the ONNX with shape inference.
    problems = check_tensorrt_rules(settings.onnx_path)
    if problems:
        raise BackendError(f"'{settings.onnx_path}' breaks TensorRT's ONNX rules: " + "; ".join(problems[:5])
                           + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
                           + ". Re-export it with unet-export")
    require_writable(cache_dir, f"a {settings.precision} engine for '{settings.onnx_path.name}' ({plan.reason})")
    h, w = settings.input_hw
    log(f"tensorrt: building a {settings.precision} engine from {settings.onnx_path.name} "
        f"(batch 1..{settings.max_batch}, {h}x{w}) on {key.gpu_name}, TensorRT {key.tensorrt_version}, because "
        f"{plan.reason}; this takes a minute or more the first time")
    start = time.perf_counter()
    engine = (builder or build_serialized_engine)(settings, cuda, log)
    elapsed = time.perf_counter() - start
    store_engine(plan, key, engine, elapsed)
    log(f"tensorrt: built {plan.engine} ({len(engine) / 1e6:.1f} MB) in {elapsed:.1f} s")
    return plan.engine


def engine_for(info: ModelInfo, options: BackendOptions, cuda: CudaApi, log: Log, version: str,
               builder: EngineBuilder | None = None) -> tuple[Path, EngineKey]:
    """The cached (or freshly built) engine for ``info`` under ``options``, and its key."""
    cache_dir = cache_folder(cache_dir_for(options.engine_cache_dir))  # refused here when others can write it
    onnx_path, precision = onnx_for_precision(info.path, options.precision, cache_dir)
    gpu = cuda.device_name(options.gpu_id)
    cc = cuda.compute_capability(options.gpu_id)
    key = make_key(onnx_path, info.input_hw, precision, options.max_batch, gpu, cc, version)
    machine = hashlib.sha256(f"{gpu}|{cc}|{version}".encode()).hexdigest()[:16]
    settings = BuildSettings(onnx_path, info.input_hw, precision, options.max_batch, options.workspace_mb,
                             timing_cache=cache_dir / f"timing-{machine}.cache", gpu_id=options.gpu_id)
    return ensure_engine(key, settings, cache_dir, cuda, log, builder), key


def build_engine(model: str | Path, options: BackendOptions, log: Log | None = None) -> Path:
    """Build (or find) the engine for ``model`` and return its path: for image builds, CI and ``unet-build-engine``."""
    options.validate()
    log = log or logging.getLogger("unet_perception").info
    version = tensorrt_version()  # first: "no TensorRT" is the likelier and clearer error than "no CUDA"
    return engine_for(read_model_info(model), options, load_cuda(), log, version)[0]
