"""The workers of ``unet-bag label-many``: Ray actors that load the model once and label one bag per call.

``BagLabeller`` labels a bag with ``tools.bag.label_bag`` into its folder in the run's work folder (``staging``),
checks its counts and renames it into place; every failure of a bag comes back as a failed ``BagResult`` with a
one-line error, so the worker goes on. ``Progress`` collects frames done per bag from all workers for the driver's
bar. Ray itself is imported only inside the actors' methods, where it is running.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unet_perception.fleet.plan import BagJob, BagResult, camera_counts, check_counts, one_line
from unet_perception.fleet.staging import attempt_folder
from unet_perception.tools.bag import BagError, label_bag


@dataclass(frozen=True)
class LabelSettings:
    """What every worker needs to label a bag as ``unet-bag label`` would."""

    model: str
    backend: str = "auto"
    batch: int = 4
    threads: int = 0
    alpha: float = 0.5
    topics: tuple[str, ...] | None = None
    storage: str | None = None
    exclude_topics: tuple[str, ...] = ()
    max_pixels: int | None = None


class Progress:
    """Ray actor: per bag, the current attempt, its frames done so far and the worker's process id."""

    def __init__(self) -> None:
        self.bags: dict[str, tuple[int, int, int]] = {}

    def start(self, name: str, pid: int) -> int:
        attempt = self.bags.get(name, (0, 0, 0))[0] + 1
        self.bags[name] = (attempt, 0, pid)
        return attempt

    def add(self, name: str, frames: int) -> None:
        attempt, done, pid = self.bags[name]
        self.bags[name] = (attempt, done + frames, pid)

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        return dict(self.bags)


class _Reporting:
    """A Segmenter that tells ``report`` how many frames each ``run`` labelled."""

    def __init__(self, inner: Any, report: Callable[[int], None]) -> None:
        self.inner, self.report = inner, report

    def run(self, frames: Sequence[Any]) -> Any:
        out = self.inner.run(frames)
        self.report(len(frames))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BagLabeller:
    """Ray actor: the model loaded once, then one bag per ``label`` call.

    The device is the worker's: ``cuda`` when Ray gave it a GPU (``--gpus-per-worker``; Ray sets
    ``CUDA_VISIBLE_DEVICES`` to it, so it is GPU 0 here), else ``cpu``. With backend ``auto`` that is TensorRT, then
    ONNX Runtime's CUDA provider, on a GPU worker and ONNX Runtime on a CPU worker, as the node picks by device.
    """

    def __init__(self, settings: LabelSettings, progress: str) -> None:
        import ray

        from unet_perception.backends.factory import BackendOptions, create_backend
        from unet_perception.pipeline import Segmenter

        # Looked up by name: an actor handle among the constructor arguments would live in the object store,
        # which Ray cannot promise to keep for restarts.
        self.settings, self.progress = settings, ray.get_actor(progress)
        device = "cuda" if ray.get_gpu_ids() else "cpu"
        options = BackendOptions(max_batch=settings.batch, threads=settings.threads, device=device)
        self.backend = create_backend(settings.backend, settings.model, options).activate()
        self.segmenter = Segmenter(self.backend, self.backend.info.classes)

    def describe(self) -> str:
        return f"{self.backend.name} ({self.backend.device}) on {socket.gethostname()} pid {os.getpid()}"

    def place(self) -> tuple[str, int]:
        """This worker's host and process id (the driver waits for a killed worker's process to end)."""
        return socket.gethostname(), os.getpid()

    def label(self, job: BagJob) -> BagResult:
        """Label ``job.src`` into ``job.out``; every failure comes back as a failed result, never raised."""
        attempt: int = self._ray().get(self.progress.start.remote(job.name, os.getpid()))
        result = BagResult(job.name, str(job.src), str(job.out), "labelled", attempts=attempt)
        if job.out.exists():  # an earlier attempt finished it and then its worker died
            result.status = "skipped"
            return result
        if job.work is None:
            raise ValueError(f"{job.name}: a job gets its work folder from label_many")
        s = self.settings
        try:
            listed = camera_counts(job.src, s.topics, s.exclude_topics)
            result.frames_in = sum(listed.values())
            work = attempt_folder(job.work, attempt)  # the attempts before it are gone, by their exact names
            try:
                summary = label_bag(job.src, work / job.name, _Reporting(self.segmenter, self._reporter(job)),
                                    topics=s.topics, storage=s.storage, batch=s.batch, alpha=s.alpha,
                                    max_pixels=s.max_pixels, exclude_topics=s.exclude_topics, progress=False,
                                    log=self._refusal(job, result), info=lambda line: result.notices.append(
                                        one_line(line)))
                result.labelled, result.seconds = sum(summary.frames.values()), summary.seconds
                result.frames_in = check_counts(work / job.name, listed, result.labelled, result.refused)
                os.rename(work / job.name, job.out)  # only a bag whose counts check out is ever in place
            finally:
                shutil.rmtree(job.work, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - one bad bag is reported; the worker goes on with the others
            result.status = "failed"
            result.error = one_line(str(exc) if isinstance(exc, BagError) else f"{type(exc).__name__}: {exc}")
        return result

    def _reporter(self, job: BagJob) -> Callable[[int], None]:
        return lambda n: self.progress.add.remote(job.name, n)

    def _refusal(self, job: BagJob, result: BagResult) -> Callable[[str], None]:
        def log(line: str) -> None:
            result.refused += 1
            result.refusals.append(one_line(line))
            self.progress.add.remote(job.name, 1)
        return log

    @staticmethod
    def _ray() -> Any:
        import ray

        return ray
