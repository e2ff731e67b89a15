"""``unet-bag label-many``: ``label`` over many bags on Ray, on this machine or on a Ray cluster.

Ray does the work of a fleet: it places one ``worker.BagLabeller`` actor per worker (CPUs/GPUs as asked),
restarts an actor whose process dies and retries the bag it was on (``max_task_retries``, bounded), and carries
progress from the workers to the driver through a small ``Progress`` actor. The driver (here) only hands the next
bag to the worker that finished one (``ray.wait``) and builds the report. Each actor loads the model once and
labels one bag per call with ``tools.bag.label_bag``, exactly as ``unet-bag label`` does.

Ray is imported only in this package and only when label-many runs, so ``unet-bag`` works without it
(``pip install -r requirements/fleet.txt``).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from unet_perception.fleet.plan import BagJob, BagResult, FleetReport, camera_counts
from unet_perception.fleet.staging import run_folder
from unet_perception.fleet.worker import BagLabeller, LabelSettings, Progress
from unet_perception.tools.bag import BagError
from unet_perception.tools.bag_preflight import process_alive

LOCAL_OBJECT_STORE_MB = 200  # only paths and small results travel through it; Ray's default is 30% of RAM
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps to 127.0.0.1 (see ray_session)
KILLED_WAIT_S = 30.0         # how long the driver waits for a killed worker's process to end


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
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # an embedded Ray reports nothing home unasked
        # An embedded Ray is this machine's alone: its services listen on loopback, never on the network. Ray
        # replaces a _node_ip_address of 127.0.0.1 by the machine's routable address (and its servers then listen
        # on all interfaces) unless multi-node clusters are off: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray's
        # processes read from the environment and this one, where ray is imported already, from ray_constants.
        constants: Any = importlib.import_module("ray._private.ray_constants")
        saved = os.environ.get(LOOPBACK_ENV), constants.ENABLE_RAY_CLUSTER
        os.environ[LOOPBACK_ENV], constants.ENABLE_RAY_CLUSTER = "0", False
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     object_store_memory=LOCAL_OBJECT_STORE_MB * 1024 * 1024, _node_ip_address="127.0.0.1")
            yield
        finally:
            ray.shutdown()
            constants.ENABLE_RAY_CLUSTER = saved[1]
            if saved[0] is None:
                os.environ.pop(LOOPBACK_ENV, None)
            else:
                os.environ[LOOPBACK_ENV] = saved[0]
        return
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
    (bag -> (attempt, frames done, worker pid)) every ``poll_s`` seconds. The jobs share one output folder (as
    ``plan_jobs`` makes them); the run works in its own hidden folder there (``staging``).
    """
    started = time.perf_counter()
    most = worker_count(workers, cpus_per_worker, gpus_per_worker)
    out_dirs = {job.out.parent for job in jobs}
    if len(out_dirs) != 1:
        raise BagError(f"label_many writes into one output folder; these jobs go to {sorted(map(str, out_dirs))}")
    results: dict[str, BagResult] = {}
    described: list[str] = []
    with run_folder(out_dirs.pop()) as run:  # this run's work folder, removed at its end; a killed run's before
        todo: deque[BagJob] = deque()
        for i, job in enumerate(jobs):
            if job.out.exists():
                results[job.name] = BagResult(job.name, str(job.src), str(job.out), "skipped")
            else:
                todo.append(replace(job, work=run / str(i)))
        if todo:
            described = _label_todo(todo, results, len(jobs), settings, min(most, len(todo)), cpus_per_worker,
                                    gpus_per_worker, retries, progress, poll_s, on_poll)
    return FleetReport([results[job.name] for job in jobs], time.perf_counter() - started, described)


def _label_todo(todo: deque[BagJob], results: dict[str, BagResult], n_bags: int, settings: LabelSettings,
                n: int, cpus_per_worker: float, gpus_per_worker: float, retries: int, progress: bool,
                poll_s: float, on_poll: Callable[[dict[str, tuple[int, int, int]]], None] | None) -> list[str]:
    """Start ``n`` workers, label ``todo`` on them into ``results``, then stop them and wait until their processes
    on this machine have ended; returns the workers' descriptions."""
    import ray

    # Ray's types do not follow ray.remote(cls).options(...); the handles are Any here.
    progress_name = f"unet-bag-progress-{uuid.uuid4().hex}"
    tracker: Any = ray.remote(Progress).options(  # type: ignore[attr-defined]
        name=progress_name, num_cpus=0).remote()
    actor: Any = ray.remote(BagLabeller).options(  # type: ignore[attr-defined]
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=-1, max_task_retries=retries)
    pool: list[Any] = [actor.remote(settings, progress_name) for _ in range(n)]
    pids: set[int] = set()  # worker processes on this machine, restarted ones too
    try:
        try:
            described: list[str] = ray.get([a.describe.remote() for a in pool])
            places = ray.get([a.place.remote() for a in pool])
        except ray.exceptions.RayActorError as exc:
            raise BagError(f"the workers cannot load the model: {_last_line(exc)}") from exc
        local = all(host == socket.gethostname() for host, _ in places)
        pids.update(pid for host, pid in places if host == socket.gethostname())
        total = sum(_frames_or_zero(job, settings) for job in todo)
        _run_pool(pool, tracker, todo, results, n_bags, total, retries, progress, poll_s, on_poll,
                  pids if local else None)
    finally:
        for a in [*pool, tracker]:
            ray.kill(a)
        # ray.kill only asks: a killed worker goes on labelling until its process ends (measured: 0.1-0.3 s
        # on a loaded 2-core machine, Ray's workers run at nice 19). Until then it can still write into its
        # work folder, or rename a bag into place, after the run's work folder is removed and a rerun began.
        _wait_until_gone(pids)
    return described


def _wait_until_gone(pids: set[int], timeout: float = KILLED_WAIT_S) -> None:
    """Wait until the processes ``pids`` (killed workers on this machine) have ended, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:  # a zombie (not reaped) is gone
        time.sleep(0.02)


def _last_line(exc: BaseException) -> str:
    """The last line of a Ray error: the worker's own error, without Ray's traceback above it."""
    return ([line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__])[-1]


def _frames_or_zero(job: BagJob, settings: LabelSettings) -> int:
    try:
        return sum(camera_counts(job.src, settings.topics, settings.exclude_topics).values())
    except Exception:  # noqa: BLE001 - only the progress bar's total; a bag that cannot be read: its worker says why
        return 0


def _run_pool(pool: list[Any], tracker: Any, todo: deque[BagJob], results: dict[str, BagResult], n_bags: int,
              total: int, retries: int, progress: bool, poll_s: float,
              on_poll: Callable[[dict[str, tuple[int, int, int]]], None] | None, pids: set[int] | None) -> None:
    """Hand each idle worker the next bag until all are done; one bar over bags and frames. ``pids`` (workers on
    this machine) gains the process of each worker that Ray restarted."""
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
                error = f"its worker died on each of {retries + 1} tries: {_last_line(exc)}"
                results[job.name] = BagResult(job.name, str(job.src), str(job.out), "failed",
                                              attempts=retries + 1, error=error)
            except ray.exceptions.RayError as exc:  # Ray itself failed the call (label() returns bag errors)
                results[job.name] = BagResult(job.name, str(job.src), str(job.out), "failed", attempts=1,
                                              error=f"{type(exc).__name__}: {_last_line(exc)}")
        snapshot: dict[str, tuple[int, int, int]] = ray.get(tracker.snapshot.remote())
        if pids is not None:
            pids.update(pid for _, _, pid in snapshot.values())
        bar.n = sum(frames for _, frames, _ in snapshot.values())
        bar.set_description(f"bags {len(results)}/{n_bags}", refresh=False)
        bar.set_postfix(failed=sum(r.status == "failed" for r in results.values()), refresh=False)
        bar.refresh()
        if on_poll is not None:
            on_poll(snapshot)
    bar.close()
