"""unet-bag label-many: many real bags on a local Ray with 2 workers (tiny model, few small frames)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import bag_messages

from unet_perception.fleet.plan import REPORT_NAME, expand_inputs, plan_jobs
from unet_perception.tools.bag import BagError, bag_from_images
from unet_perception.tools.bag_cli import main

START = 1_700_000_000_000_000_000
pytestmark = pytest.mark.fleet


def _images(folder: Path, n: int, hw: tuple[int, int]) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(n)
    paths = [folder / f"frame_{i:03d}.png" for i in range(n)]
    for path in paths:
        cv2.imwrite(str(path), rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    return paths



def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- planning (no Ray)


def test_inputs_folders_globs_lists_and_name_clashes(tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    for name in ("d1", "d2", "x1"):
        (bags / name).mkdir(parents=True)
    (bags / "single.mcap").write_bytes(b"")
    (bags / "notes.txt").write_text("not a bag")
    (bags / "labelled").mkdir()
    listing = tmp_path / "todo.txt"
    listing.write_text("# bags to label\nbags/x1\n\nbags/d1   # again, listed once\n")
    found = expand_inputs([str(bags / "d*"), str(listing), str(bags / "single.mcap"), str(bags / "*")],
                          out_dir=bags / "labelled")
    assert [p.name for p in found] == ["d1", "d2", "x1", "single.mcap"]
    jobs = plan_jobs(found, tmp_path / "out")
    assert [j.out for j in jobs] == [(tmp_path / "out" / n).absolute() for n in ("d1", "d2", "x1", "single")]
    assert all(j.src.is_absolute() for j in jobs)

    (tmp_path / "other" / "d1").mkdir(parents=True)
    with pytest.raises(BagError, match="2 inputs would be written to .*d1"):
        plan_jobs([bags / "d1", tmp_path / "other" / "d1"], tmp_path / "out")
    with pytest.raises(BagError, match="no bag at .*missing"):
        expand_inputs([str(tmp_path / "missing")])
    with pytest.raises(BagError, match="matches no bag"):
        expand_inputs([str(tmp_path / "nothing*")])


def test_count_check_reads_the_labelled_bag(tmp_path: Path, tiny_model: Path) -> None:
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter
    from unet_perception.tools.bag import label_bag
    from unet_perception.fleet.plan import camera_counts, check_counts

    src, out = tmp_path / "in", tmp_path / "out"
    bag_from_images(_images(tmp_path / "img", 5, (24, 32)), src, start_ns=START, progress=False)
    with create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=2)) as backend:
        label_bag(src, out, Segmenter(backend, backend.info.classes), progress=False)
    listed = camera_counts(src, None)
    assert listed == Counter({"/camera/image_raw": 5})
    assert check_counts(out, listed, labelled=5, refused=0) == 5
    with pytest.raises(BagError, match="frames lost: the input lists 7 camera messages, 5 were read"):
        check_counts(out, Counter({"/camera/image_raw": 7}), labelled=5, refused=0)
    with pytest.raises(BagError, match="do not add up: 5 frames in, 5 label images written, 4 labelled"):
        check_counts(out, listed, labelled=4, refused=0)
    with pytest.raises(BagError, match="do not add up: 5 frames in, 5 label images written, 5 labelled \\+ 1"):
        check_counts(out, listed, labelled=5, refused=1)


def test_unet_bag_builds_its_parser_without_importing_ray() -> None:
    code = ("import sys; from unet_perception.tools.bag_cli import build_parser; "
            "build_parser().parse_args(['label-many', 'x', '--out', 'y']); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module: 2 CPUs, so 2 workers."""
    pytest.importorskip("ray", reason="label-many needs Ray: pip install -r requirements/fleet.txt")
    from unet_perception.fleet.driver import ray_session

    with ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small bags written with unet-bag's own writer: raw sqlite3, raw mcap, JPEG, and a longer one."""
    root = tmp_path_factory.mktemp("fleet_src")
    small = _images(root / "small", 9, (48, 64))
    large = _images(root / "large", 150, (240, 320))
    bags = root / "bags"
    bags.mkdir()
    made = {"a": dict(images=small[:6]), "b": dict(images=small, storage="mcap"),
            "c": dict(images=small[:8], topic="/front/image_raw", compressed=True), "big": dict(images=large)}
    for name, kwargs in made.items():
        bag_from_images(out=bags / name, start_ns=START, progress=False, **kwargs)  # type: ignore[arg-type]
    shutil.move(bags / "c", root / "c_recorded")
    _restamped(root / "c_recorded", bags / "c", CAMERA_CLOCK_LAG_NS)
    return {name: bags / name for name in made}


CAMERA_CLOCK_LAG_NS = 1_234_567_891  # bag c: header stamps this far before the bag (receive) timestamps


def _restamped(src: Path, dst: Path, lag_ns: int) -> None:
    """A copy of ``src`` whose header stamps are ``lag_ns`` before its bag timestamps, as a camera stamping
    frames with its own clock records them; then only a copied header gives an output the input's stamp."""
    from dataclasses import replace

    from rosbags.rosbag2 import Reader, Writer

    from unet_perception.tools.bag import stamp_msg, typestore

    store = typestore()
    with Reader(src) as reader, Writer(dst, version=8) as writer:
        conns = {c.id: writer.add_connection(c.topic, c.msgtype, typestore=store) for c in reader.connections}
        for conn, ts, raw in reader.messages():
            msg: Any = store.deserialize_cdr(raw, conn.msgtype)
            msg = replace(msg, header=replace(msg.header, stamp=stamp_msg(store, ts - lag_ns)))
            writer.write(conns[conn.id], ts, store.serialize_cdr(msg, conn.msgtype))


def _headers(bag: Path, topics: set[str] | None = None) -> dict[str, dict[int, tuple[int, int, str]]]:
    """topic -> {bag timestamp: (header.stamp.sec, .nanosec, frame_id)}, read with rosbags alone."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)
    out: dict[str, dict[int, tuple[int, int, str]]] = {}
    with Reader(bag) as reader:
        for conn, ts, raw in reader.messages():
            if topics is None or conn.topic in topics:
                header = store.deserialize_cdr(raw, conn.msgtype).header  # type: ignore[attr-defined]
                out.setdefault(conn.topic, {})[ts] = (header.stamp.sec, header.stamp.nanosec, header.frame_id)
    return out


def _assert_outputs_carry_input_stamps(src: Path, out: Path) -> None:
    """Every message the labelling added (the topics ``out`` has and ``src`` has not) carries the header of the
    input frame at its timestamp: stamp and frame_id, as read from the input bag itself."""
    from rosbags.rosbag2 import Reader

    with Reader(src) as reader:
        cameras = {c.topic for c in reader.connections if c.msgtype.endswith(("/Image", "/CompressedImage"))}
    inputs = _headers(src, cameras)
    assert len(inputs) == 1, inputs.keys()  # one camera per source bag: each timestamp names one input frame
    frames = next(iter(inputs.values()))
    added = {t: m for t, m in _headers(out).items() if t not in _headers(src)}
    assert added and all(len(m) == len(frames) for m in added.values()), {t: len(m) for t, m in added.items()}
    for topic, messages in added.items():
        assert messages == frames, f"{out.name} {topic}: header stamps differ from the input's"


@pytest.fixture(scope="module")
def single(sources: dict[str, Path], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each source bag labelled alone with `unet-bag label` (the reference)."""
    out = tmp_path_factory.mktemp("fleet_single")
    for name, src in sources.items():
        assert main(["label", str(src), str(out / name), "--model", str(tiny_model), "--backend", "onnxruntime",
                     "--threads", "1"]) == 0
    return {name: out / name for name in sources}


def _args(tiny_model: Path, out: Path) -> list[str]:
    return ["--out", str(out), "--workers", "2", "--model", str(tiny_model), "--backend", "onnxruntime",
            "--threads", "1"]


def _settings(tiny_model: Path):  # type: ignore[no-untyped-def]
    from unet_perception.fleet.driver import LabelSettings

    return LabelSettings(str(tiny_model), "onnxruntime", threads=1)


def test_local_ray_keeps_to_loopback(local_ray: None) -> None:
    import ray

    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


def test_all_bags_labelled_as_label_does(local_ray: None, sources: dict[str, Path], single: dict[str, Path],
                                         tiny_model: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "todo.txt"
    listing.write_text(f"{sources['c']}\n")
    out = tmp_path / "out"
    assert main(["label-many", str(sources["a"].parent / "[ab]"), str(listing), *_args(tiny_model, out)]) == 0
    printed = capsys.readouterr().out
    assert "3 labelled, 0 skipped (output existed), 0 failed" in printed
    assert "counts checked: frames in = labelled + refused for all 3 labelled bags (23 = 23 + 0)" in printed
    for name in ("a", "b", "c"):
        # every message, frame by frame, byte for byte
        assert bag_messages(out / name) == bag_messages(single[name]), name
        # label shares its code with label-many: the stamps come from the input bag itself
        _assert_outputs_carry_input_stamps(sources[name], out / name)
    stamps = _headers(sources["c"])["/front/image_raw/compressed"]  # the fixture did restamp c
    assert all(ts - CAMERA_CLOCK_LAG_NS == sec * 10**9 + ns for ts, (sec, ns, _) in stamps.items())
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["bags"] == {"labelled": 3, "skipped": 0, "failed": 0}
    assert [(r["name"], r["frames_in"], r["labelled"], r["counts_ok"]) for r in report["results"]] == \
        [("a", 6, 6, True), ("b", 9, 9, True), ("c", 8, 8, True)]
    assert len(report["workers"]) == 2 and all("onnxruntime" in w for w in report["workers"])
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", REPORT_NAME]


def test_worker_killed_mid_bag_is_retried(local_ray: None, sources: dict[str, Path], single: dict[str, Path],
                                          tiny_model: Path, tmp_path: Path) -> None:
    from unet_perception.fleet.driver import label_many

    killed: list[int] = []

    def kill_mid_bag(snapshot: dict[str, tuple[int, int, int]]) -> None:
        attempt, frames, pid = snapshot.get("big", (0, 0, 0))
        if not killed and attempt == 1 and 0 < frames < 100:
            os.kill(pid, signal.SIGKILL)
            killed.append(frames)

    out = tmp_path / "out"
    jobs = plan_jobs([sources[n] for n in ("big", "a", "b")], out)
    report = label_many(jobs, _settings(tiny_model), workers=2, progress=False, poll_s=0.02, on_poll=kill_mid_bag)
    assert killed, "the test did not manage to kill the worker while it was labelling 'big'"
    by_name = {r.name: r for r in report.results}
    assert [r.status for r in report.results] == ["labelled"] * 3, report.table()
    assert by_name["big"].attempts == 2 and by_name["big"].labelled == 150 and by_name["big"].counts_ok
    for name in ("big", "a", "b"):
        assert bag_messages(out / name) == bag_messages(single[name]), name
    assert _hidden(out) == []


def test_rerun_after_interruption_does_only_the_missing_bags(local_ray: None, sources: dict[str, Path],
                                                              single: dict[str, Path], tiny_model: Path,
                                                              tmp_path: Path) -> None:
    from unet_perception.fleet.driver import label_many
    from unet_perception.tools.bag_preflight import process_alive

    out = tmp_path / "out"
    jobs = plan_jobs([sources[n] for n in ("a", "big", "b", "c")], out)

    workers: set[int] = set()

    def interrupt_after_first_bag(snapshot: dict[str, tuple[int, int, int]]) -> None:
        workers.update(pid for _, _, pid in snapshot.values())
        if any(job.out.exists() for job in jobs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_many(jobs, _settings(tiny_model), workers=2, progress=False, poll_s=0.02,
                   on_poll=interrupt_after_first_bag)
    # ray.kill only asks; label_many returns once its killed workers have ended, so none can still write a bag
    assert workers and not [pid for pid in workers if process_alive(pid)], "a killed worker still runs"
    first = {job.name: (job.out / "metadata.yaml").stat().st_mtime_ns for job in jobs if job.out.exists()}
    assert first and "big" not in first
    for job in jobs:  # every output is whole or absent
        if job.name in first:
            assert bag_messages(job.out) == bag_messages(single[job.name])

    report = label_many(jobs, _settings(tiny_model), workers=2, progress=False)
    status = {r.name: r.status for r in report.results}
    assert {n for n, s in status.items() if s == "skipped"} == set(first)
    assert {n for n, s in status.items() if s == "labelled"} == {"a", "big", "b", "c"} - set(first)
    assert {n: (out / n / "metadata.yaml").stat().st_mtime_ns for n in first} == first  # not redone
    for job in jobs:
        assert bag_messages(job.out) == bag_messages(single[job.name]), job.name
    assert _hidden(out) == []


def test_label_many_deletes_only_what_it_made(local_ray: None, sources: dict[str, Path], single: dict[str, Path],
                                             tiny_model: Path, tmp_path: Path) -> None:
    """Bags named run1 and run[1] (run[1]'s cleanup glob used to delete run1's work: "disk I/O error"), names with
    glob characters, spaces and unicode; a partial folder of a killed run of this output, and hidden folders of
    others'. run1 is the long bag: it is in progress on one worker while the other does the small ones, the last
    two of them named so that a glob of their names matches run1's."""
    from test_fleet_staging import HOSTILE, _decoys, killed_run

    source = {name: "big" if name == "run1" else "a" for name in HOSTILE} | {"m?cap #%41": "b"}  # "?": MCAP only
    bags = tmp_path / "bags"
    for name, src in source.items():
        shutil.copytree(sources[src], bags / name)
    out = tmp_path / "out"
    partial = killed_run(out)
    decoys = _decoys(out)
    assert main(["label-many", *(str(bags / n) for n in source), *_args(tiny_model, out)]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert {r["name"]: r["status"] for r in report["results"]} == dict.fromkeys(source, "labelled"), report
    for name, src in source.items():
        assert bag_messages(out / name) == bag_messages(single[src]), name
    assert not partial.exists()
    assert all((d / "keep").read_text() == "not label-many's" for d in decoys)
    assert sorted(p.name for p in out.iterdir()) == sorted([*source, REPORT_NAME, *(d.name for d in decoys)])


def test_a_worker_whose_count_check_fails_leaves_no_output(local_ray: None, sources: dict[str, Path],
                                                          tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker labels a real bag, the real count check finds the input listed one frame more than was read:
    the labelled bag must never be renamed into place (a rerun would skip it as finished)."""
    import ray

    from unet_perception.fleet import worker
    from unet_perception.fleet.plan import BagJob
    from unet_perception.fleet.staging import run_folder

    name = f"progress-{tmp_path.name}"
    tracker: Any = ray.remote(worker.Progress).options(  # type: ignore[attr-defined]
        name=name, num_cpus=0).remote()
    try:
        labeller = worker.BagLabeller(_settings(tiny_model), name)  # in this process: the check can be patched
        with run_folder(tmp_path / "out") as run:
            done = labeller.label(BagJob(sources["a"], tmp_path / "out" / "a", run / "0"))
            assert done.status == "labelled" and (tmp_path / "out" / "a").is_dir(), done  # as it is without a fault

            real = worker.check_counts
            monkeypatch.setattr(worker, "check_counts", lambda out, listed, labelled, refused: real(
                out, listed + Counter(listed.keys()), labelled, refused))
            job = BagJob(sources["b"], tmp_path / "out" / "b", run / "1")
            result = labeller.label(job)
            assert result.status == "failed" and "frames lost: the input lists 10 camera messages, 9 were read" \
                in result.error, result
            assert not job.out.exists(), "a bag that failed its count check was renamed into place"
            assert job.work is not None and not job.work.exists()
    finally:
        ray.kill(tracker)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a"]


def test_corrupt_bag_is_reported_and_the_others_finish(local_ray: None, sources: dict[str, Path],
                                                       single: dict[str, Path], tiny_model: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "in" / "bad"
    shutil.copytree(sources["big"], bad)
    data = bad / "big.db3"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])
    short = tmp_path / "in" / "short"  # its metadata promises 8 frames, its storage holds 6
    shutil.copytree(sources["a"], short)
    meta = short / "metadata.yaml"
    meta.write_text(meta.read_text().replace("message_count: 6", "message_count: 8"))
    garbled = tmp_path / "in" / "garbled"  # its metadata.yaml does not parse: a YAML error spans lines
    shutil.copytree(sources["a"], garbled)
    meta = garbled / "metadata.yaml"
    meta.write_text(meta.read_text().replace("rosbag2_bagfile_information:", "rosbag2_bagfile_information:\n  : [", 1))
    out = tmp_path / "out"
    code = main(["label-many", str(sources["a"]), str(bad), str(short), str(garbled), str(sources["b"]),
                 *_args(tiny_model, out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "2 labelled, 0 skipped (output existed), 3 failed" in printed
    report = json.loads((out / REPORT_NAME).read_text())
    failed = {r["name"]: r["error"] for r in report["results"] if r["status"] == "failed"}
    assert list(failed) == ["bad", "short", "garbled"] and str(bad) in failed["bad"], failed
    assert [r["attempts"] for r in report["results"]] == [1, 1, 1, 1, 1]  # a bad bag is not retried
    assert all("\n" not in error for error in failed.values()), failed  # one line each, no traceback
    assert "Traceback" not in printed and "metadata.yaml" in failed["garbled"], failed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.split()[:1] in (["bad"], ["short"],
                                                                                        ["garbled"])}
    assert sorted(rows) == ["bad", "garbled", "short"]  # the table: one row per failed bag, its reason in it
    assert all(failed[name] in row for name, row in rows.items()), rows
    assert "8" in failed["short"] and "6" in failed["short"], failed  # the count check names both counts
    for name in ("a", "b"):
        assert bag_messages(out / name) == bag_messages(single[name])
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", REPORT_NAME]


def test_workers_that_cannot_start_are_one_error_not_a_hang(local_ray: None, sources: dict[str, Path],
                                                            tiny_model: Path, tmp_path: Path) -> None:
    from unet_perception.fleet.driver import LabelSettings, label_many

    jobs = plan_jobs([sources["a"]], tmp_path / "cpu")  # tensorrt on a CPU-only worker: its constructor raises
    with pytest.raises(BagError, match="the workers cannot load the model: .*BackendError: the tensorrt backend"):
        label_many(jobs, LabelSettings(str(tiny_model), "tensorrt"), workers=1, progress=False)
    assert _hidden(tmp_path / "cpu") == [] and not jobs[0].out.exists()

    jobs = plan_jobs([sources["a"]], tmp_path / "out")  # workers the cluster cannot place
    with pytest.raises(BagError, match="has 0 GPUs; a worker needs 1 .--gpus-per-worker."):
        label_many(jobs, _settings(tiny_model), gpus_per_worker=1, progress=False)
    with pytest.raises(BagError, match="has 2 CPUs; a worker needs 3 .--cpus-per-worker."):
        label_many(jobs, _settings(tiny_model), workers=1, cpus_per_worker=3, progress=False)
    assert not (tmp_path / "out").exists()
