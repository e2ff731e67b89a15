"""unet-bag label-many on this machine: frames/s with 1 and 2 workers, and Ray's overhead against `label`.

    python benchmarks/fleet.py                      # shipped model, 4 bags x 8 CamVid frames, about 3 min on 2 cores
    python benchmarks/fleet.py --model tiny.onnx    # a small model: what is left is Ray's and the bag I/O's cost
    PYTHONPATH=/path/to/pyarrow-pandas python benchmarks/fleet.py --ray-data   # also Ray Data map_batches

Rows:
* `label` CLI, 1 bag / `label-many` CLI, 1 bag, 1 worker: the same bag end to end as a user runs it (process
  start, imports, model load, and for label-many starting a local Ray); the difference is Ray's overhead.
* label-many on all bags with 1 worker (1 and 2 threads) and 2 workers (1 thread each), on one local Ray started
  once (its start time is printed apart); frames/s over the run, workers' start (model load) included.
* with --ray-data: the same bags through Ray Data `map_batches` with a callable class (one bag per row), the
  alternative the issue names; needs pyarrow and pandas importable.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from unet_perception.fleet.driver import LabelSettings, label_many, ray_session
from unet_perception.fleet.plan import BagJob, plan_jobs
from unet_perception.tools.bag import bag_from_images, label_bag

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pipeline as stages  # noqa: E402  (benchmarks/pipeline.py: default model, CamVid folder)

BIN = Path(sys.executable).parent


def make_bags(folder: Path, bags: int, frames: int) -> list[Path]:
    """``bags`` sqlite3 bags of ``frames`` CamVid val frames each (960x720 rgb8), or noise without the data."""
    images = sorted(stages.CAMVID_VAL.glob("*.png"))[: bags * frames]
    if len(images) < bags * frames:
        (folder / "noise").mkdir()
        rng = np.random.default_rng(0)
        images = [folder / "noise" / f"{i:04d}.png" for i in range(bags * frames)]
        for path in images:
            cv2.imwrite(str(path), rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    out = []
    for b in range(bags):
        out.append(folder / "bags" / f"drive_{b:02d}")
        out[-1].parent.mkdir(exist_ok=True)
        bag_from_images(images[b * frames:(b + 1) * frames], out[-1], start_ns=0, progress=False)
    return out


def timed_cli(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "unet-bag"), *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - started


class LabelRows:
    """Ray Data callable class: the model loaded once per actor, one bag per row."""

    def __init__(self, settings: LabelSettings) -> None:
        from unet_perception.backends.factory import BackendOptions, create_backend
        from unet_perception.pipeline import Segmenter

        backend = create_backend(settings.backend, settings.model,
                                 BackendOptions(max_batch=settings.batch, threads=settings.threads)).activate()
        self.segmenter, self.settings = Segmenter(backend, backend.info.classes), settings

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        labelled = [sum(label_bag(Path(src), Path(out), self.segmenter, batch=self.settings.batch,
                                  progress=False).frames.values())
                    for src, out in zip(batch["src"], batch["out"], strict=True)]
        return {"out": batch["out"], "labelled": np.array(labelled)}


def ray_data_run(jobs: list[BagJob], settings: LabelSettings, workers: int) -> tuple[float, int]:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    rows = ray.data.from_items([{"src": str(j.src), "out": str(j.out)} for j in jobs]).map_batches(
        LabelRows, fn_constructor_kwargs={"settings": settings}, batch_size=1, concurrency=workers,
        num_cpus=1).take_all()
    return time.perf_counter() - started, sum(int(r["labelled"]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--bags", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8, help="frames per bag")
    parser.add_argument("--ray-data", action="store_true", help="also time Ray Data map_batches")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet_bench_"))
    try:
        model, model_name = stages.model_or_default(args.model, tmp)
        bags = make_bags(tmp, args.bags, args.frames)
        common = ["--model", str(model), "--backend", "onnxruntime", "--threads", "2"]
        rows: list[tuple[str, int, float]] = []
        one = args.frames
        rows.append(("`label` CLI, 1 bag, 2 threads", one, timed_cli(["label", str(bags[0]), str(tmp / "plain"),
                                                                        *common])))
        rows.append(("`label-many` CLI, 1 bag, 1 worker x 2 threads", one, timed_cli(
            ["label-many", str(bags[0]), "--out", str(tmp / "many1"), "--workers", "1", "--cpus-per-worker", "2",
             *common])))
        started = time.perf_counter()
        with ray_session(num_cpus=2):
            ray_start = time.perf_counter() - started
            for name, workers, cpus in (("1 worker x 1 thread", 1, 1), ("1 worker x 2 threads", 1, 2),
                                        ("2 workers x 1 thread", 2, 1)):
                out = tmp / name.replace(" ", "_")
                settings = LabelSettings(str(model), "onnxruntime", threads=cpus)
                report = label_many(plan_jobs(bags, out), settings, workers=workers, cpus_per_worker=cpus,
                                    progress=False)
                assert report.count("labelled") == len(bags), report.table()
                rows.append((f"label-many, {len(bags)} bags, {name}", report.labelled_frames, report.seconds))
            if args.ray_data:
                out = tmp / "ray_data"
                out.mkdir()
                seconds, frames = ray_data_run(plan_jobs(bags, out), LabelSettings(str(model), "onnxruntime",
                                                                                   threads=1), 2)
                rows.append((f"Ray Data map_batches, {len(bags)} bags, 2 workers x 1 thread", frames, seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}; "
          f"model: {model_name}; {args.bags} bags x {args.frames} frames; local Ray start {ray_start:.1f} s "
          "(not in the label-many rows)\n")
    print("| run | frames | s | frames/s |\n|---|---:|---:|---:|")
    for name, frames, seconds in rows:
        print(f"| {name} | {frames} | {seconds:.1f} | {frames / seconds:.2f} |")
    overhead = rows[1][2] - rows[0][2]
    print(f"\nRay's overhead on one bag (label-many CLI - label CLI): {overhead:.1f} s "
          f"({100 * overhead / rows[0][2]:.0f}% of `label`)")


if __name__ == "__main__":
    main()
