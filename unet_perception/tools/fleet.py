"""``unet-bag label-many``: ``label`` over many bags on Ray, on this machine or on a Ray cluster.

Ray does the work of a fleet: it places one ``BagLabeller`` actor per worker (CPUs/GPUs as asked), restarts an
actor whose process dies and retries the bag it was on (``max_task_retries``, bounded), and carries progress
from the workers to the driver through a small ``Progress`` actor. The driver only hands the next bag to the
worker that finished one (``ray.wait``) and writes the report. Each actor loads the model once and labels one
bag per call with ``bag.label_bag``, exactly as ``unet-bag label`` does.

Ray is imported only here and only when label-many runs, so ``unet-bag`` works without it
(``pip install -r requirements/fleet.txt``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from unet_perception.tools.bag import STORAGES, BagError, label_bag
from unet_perception.tools.fleet_plan import (
    REPORT_NAME,
    BagJob,
    BagResult,
    FleetReport,
    camera_counts,
    check_counts,
    expand_inputs,
    plan_jobs,
)

LOCAL_OBJECT_STORE_MB = 200  # only paths and small results travel through it; Ray's default is 30% of RAM


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
    """Ray actor: the model loaded once (backend as ``label`` picks it), then one bag per ``label`` call."""

    def __init__(self, settings: LabelSettings, progress: str) -> None:
        import ray

        from unet_perception.backends.factory import BackendOptions, create_backend
        from unet_perception.pipeline import Segmenter

        # Looked up by name: an actor handle among the constructor arguments would live in the object store,
        # which Ray cannot promise to keep for restarts.
        self.settings, self.progress = settings, ray.get_actor(progress)
        options = BackendOptions(max_batch=settings.batch, threads=settings.threads)
        self.backend = create_backend(settings.backend, settings.model, options).activate()
        self.segmenter = Segmenter(self.backend, self.backend.info.classes)

    def describe(self) -> str:
        return f"{self.backend.name} ({self.backend.device}) on {socket.gethostname()} pid {os.getpid()}"

    def label(self, job: BagJob) -> BagResult:
        """Label ``job.src`` into ``job.out``; every failure comes back as a failed result, never raised."""
        attempt: int = self._ray().get(self.progress.start.remote(job.name, os.getpid()))
        result = BagResult(job.name, str(job.src), str(job.out), "labelled", attempts=attempt)
        if job.out.exists():  # an earlier attempt finished it and then its worker died
            result.status = "skipped"
            return result
        job.remove_leftovers()  # of an attempt whose worker was killed
        s = self.settings
        try:
            listed = camera_counts(job.src, s.topics)
            result.frames_in = sum(listed.values())
            work = Path(tempfile.mkdtemp(prefix=job.work_prefix(), dir=job.out.parent))
            try:
                summary = label_bag(job.src, work / job.name, _Reporting(self.segmenter, self._reporter(job)),
                                    topics=s.topics, storage=s.storage, batch=s.batch, alpha=s.alpha,
                                    progress=False, log=self._refusal(job, result))
                result.labelled, result.seconds = sum(summary.frames.values()), summary.seconds
                result.frames_in = check_counts(work / job.name, listed, result.labelled, result.refused)
                os.rename(work / job.name, job.out)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - one bad bag is reported; the worker goes on with the others
            result.status = "failed"
            result.error = str(exc) if isinstance(exc, BagError) else f"{type(exc).__name__}: {exc}"
        return result

    def _reporter(self, job: BagJob) -> Callable[[int], None]:
        return lambda n: self.progress.add.remote(job.name, n)

    def _refusal(self, job: BagJob, result: BagResult) -> Callable[[str], None]:
        def log(line: str) -> None:
            result.refused += 1
            result.refusals.append(line)
            self.progress.add.remote(job.name, 1)
        return log

    @staticmethod
    def _ray() -> Any:
        import ray

        return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at ``address``, or start a local Ray on this machine (stopped at the end).

    A program that is connected to Ray already keeps its connection (``address`` is then not used).
    """
    try:
        import ray
    except ImportError as exc:
        raise BagError("label-many needs Ray: pip install -r requirements/fleet.txt") from exc
    if ray.is_initialized():
        yield
        return
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise BagError(f"cannot reach the Ray cluster at {address}: {exc}; is `ray start --head` running "
                           "there, and has this machine the cluster's token (RAY_AUTH_MODE=token, with the head's "
                           "~/.ray/auth_token copied here or RAY_AUTH_TOKEN set; see docs/bags.md)?") from exc
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 object_store_memory=LOCAL_OBJECT_STORE_MB * 1024 * 1024)
    try:
        yield
    finally:
        ray.shutdown()


def worker_count(workers: int | None, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """``workers``, or as many as the cluster's GPUs (with --gpus-per-worker) or CPUs hold; a ``BagError`` when
    not even one worker fits (Ray would wait for it forever)."""
    import ray

    total = ray.cluster_resources()
    for name, need in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if need > total.get(name, 0):
            raise BagError(f"the Ray cluster has {total.get(name, 0):g} {name}s; a worker needs {need:g} "
                           f"(--{name.lower()}s-per-worker); lower it or add nodes with {name}s")
    if workers:
        return workers
    if gpus_per_worker > 0:
        return max(1, int(total.get("GPU", 0) // gpus_per_worker))
    return max(1, int(total.get("CPU", 1) // cpus_per_worker))


def label_many(jobs: Sequence[BagJob], settings: LabelSettings, *, workers: int | None = None,
               cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, retries: int = 2,
               progress: bool = True, poll_s: float = 0.2,
               on_poll: Callable[[dict[str, tuple[int, int, int]]], None] | None = None) -> FleetReport:
    """Label every job whose output does not exist yet, on the connected Ray; returns the report.

    ``retries``: how often Ray retries a bag whose worker died on it. ``on_poll`` gets the progress snapshot
    (bag -> (attempt, frames done, worker pid)) every ``poll_s`` seconds.
    """
    import ray

    started = time.perf_counter()
    most = worker_count(workers, cpus_per_worker, gpus_per_worker)
    results: dict[str, BagResult] = {}
    todo: deque[BagJob] = deque()
    for job in jobs:
        job.out.parent.mkdir(parents=True, exist_ok=True)
        job.remove_leftovers()
        if job.out.exists():
            results[job.name] = BagResult(job.name, str(job.src), str(job.out), "skipped")
        else:
            todo.append(job)
    described: list[str] = []
    if todo:
        n = min(most, len(todo))
        # Ray's types do not follow ray.remote(cls).options(...); the handles are Any here.
        progress_name = f"unet-bag-progress-{uuid.uuid4().hex}"
        tracker: Any = ray.remote(Progress).options(  # type: ignore[attr-defined]
            name=progress_name, num_cpus=0).remote()
        actor: Any = ray.remote(BagLabeller).options(  # type: ignore[attr-defined]
            num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=-1, max_task_retries=retries)
        pool: list[Any] = [actor.remote(settings, progress_name) for _ in range(n)]
        try:
            try:
                described = ray.get([a.describe.remote() for a in pool])
            except ray.exceptions.RayActorError as exc:
                raise BagError(f"the workers cannot load the model: {exc}") from exc
            total = sum(_frames_or_zero(job, settings.topics) for job in todo)
            _run_pool(pool, tracker, todo, results, len(jobs), total, retries, progress, poll_s, on_poll)
        finally:
            for a in [*pool, tracker]:
                ray.kill(a)
            for job in jobs:
                if job.name not in results:  # interrupted: leave nothing half-done behind
                    job.remove_leftovers()
    return FleetReport([results[job.name] for job in jobs], time.perf_counter() - started, described)


def _frames_or_zero(job: BagJob, topics: Sequence[str] | None) -> int:
    try:
        return sum(camera_counts(job.src, topics).values())
    except BagError:
        return 0  # a bag that cannot be read: its worker reports why


def _run_pool(pool: list[Any], tracker: Any, todo: deque[BagJob], results: dict[str, BagResult], n_bags: int,
              total: int, retries: int, progress: bool, poll_s: float,
              on_poll: Callable[[dict[str, tuple[int, int, int]]], None] | None) -> None:
    """Hand each idle worker the next bag until all are done; one bar over bags and frames."""
    import ray

    bar = tqdm(total=total, unit="frame", disable=not progress, desc=f"bags {len(results)}/{n_bags}")
    idle, running = list(pool), dict[Any, tuple[Any, BagJob]]()
    while todo or running:
        while idle and todo:
            worker, job = idle.pop(), todo.popleft()
            running[worker.label.remote(job)] = (worker, job)
        done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in done:
            worker, job = running.pop(ref)
            idle.append(worker)
            try:
                results[job.name] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # its worker died on it on every try
                error = f"its worker died on each of {retries + 1} tries: {exc}"
                results[job.name] = BagResult(job.name, str(job.src), str(job.out), "failed",
                                              attempts=retries + 1, error=error)
            except ray.exceptions.RayError as exc:  # Ray itself failed the call (label() returns bag errors)
                results[job.name] = BagResult(job.name, str(job.src), str(job.out), "failed", attempts=1,
                                              error=f"{type(exc).__name__}: {exc}")
        snapshot: dict[str, tuple[int, int, int]] = ray.get(tracker.snapshot.remote())
        bar.n = sum(frames for _, frames, _ in snapshot.values())
        bar.set_description(f"bags {len(results)}/{n_bags}", refresh=False)
        bar.set_postfix(failed=sum(r.status == "failed" for r in results.values()), refresh=False)
        bar.refresh()
        if on_poll is not None:
            on_poll(snapshot)
    bar.close()


# ---------------------------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """The ``label-many`` subcommand of ``unet-bag`` (Ray is imported only when it runs)."""
    p = sub.add_parser("label-many", help="label many bags on Ray (this machine or a cluster), resumable",
                       description="Label every input bag as `unet-bag label` does, on a local Ray or an existing "
                                   "Ray cluster, into OUT_DIR/NAME. Bags whose output exists are skipped, so a "
                                   "rerun finishes an interrupted run. Writes OUT_DIR/" + REPORT_NAME + ".")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="bag folder, .db3/.mcap file, glob, or a text file listing them (one a line)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the labelled bags")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="existing Ray cluster: auto (this node is in one) or ray://HEAD:10001 "
                        "(default: start a local Ray on this machine)")
    p.add_argument("--workers", type=int, default=None,
                   help="workers, each with the model loaded once (default: as many as the CPUs/GPUs hold)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker, e.g. 1 or 0.5 (default: 0, CPU workers with ONNX Runtime)")
    p.add_argument("--retries", type=int, default=2,
                   help="times a bag is retried when its worker dies on it (default: %(default)s)")
    p.add_argument("--model", default="", help="ONNX model (default: the package's models/unet_camvid.onnx)")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "onnxruntime", "torch"),
                   help="inference backend (default: %(default)s)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="camera topics to label (default: all)")
    p.add_argument("--storage", choices=sorted(STORAGES), default=None, help="output storage (default: as IN)")
    p.add_argument("--batch", type=int, default=4, help="frames per inference batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU inference threads per worker (default: 0 = --cpus-per-worker)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask (default: 0.5)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from unet_perception.launch_support import default_model_path

    model = args.model or str(default_model_path())
    if not Path(model).is_file():
        raise BagError(f"no model at {model}; pass --model PATH to an exported .onnx (unet-export)")
    if args.workers is not None and args.workers < 1:
        raise BagError(f"--workers must be >= 1, got {args.workers}")
    if args.retries < 0:
        raise BagError(f"--retries must be >= 0, got {args.retries}")
    jobs = plan_jobs(expand_inputs(args.inputs, args.out), args.out)
    threads = args.threads or max(1, int(args.cpus_per_worker))
    settings = LabelSettings(str(Path(model).resolve()), args.backend, args.batch, threads, args.alpha,
                             tuple(args.topics) if args.topics else None, args.storage)
    with ray_session(args.ray_address):
        report = label_many(jobs, settings, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                            gpus_per_worker=args.gpus_per_worker, retries=args.retries)
    report.write_json(args.out / REPORT_NAME)
    print(report.table())
    for line in report.workers:
        print(f"worker: {line}")
    print(f"report: {args.out / REPORT_NAME}")
    return 1 if report.count("failed") else 0
