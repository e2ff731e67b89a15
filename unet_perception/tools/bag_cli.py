"""unet-bag: make, label and play rosbag2 files without the ``ros2`` CLI.

* ``from-images DIR OUT``: an image folder -> a rosbag2 of ``sensor_msgs/Image`` or ``CompressedImage``.
* ``label IN OUT``: every camera topic of a bag through the segmentation pipeline (no ROS graph) -> a new bag
  with the original messages plus ``<ns>/segmentation/{labels,color,overlay}`` (and ``confidence`` for models
  with that output) at the same timestamps.
* ``label-many INPUTS... --out DIR``: ``label`` over many bags on Ray (this machine or a cluster), resumable
  (``unet_perception/fleet``; needs ``requirements/fleet.txt``).
* ``play BAG``: publish a bag over rclpy at its recorded timing (for machines without ``ros2 bag play``).

Bags are read and written with ``rosbags`` (sqlite3 and mcap, rosbag2 format version 8 as ROS 2 Jazzy writes
it) and the ROS 2 Jazzy message definitions, so ``ros2 bag info``/``play`` and rviz read what we write.
Outputs are written into a hidden staging folder and renamed into place only when complete. What can be checked
is checked before the work (``bag_preflight``): the output path and its free space, the input's message counts
(metadata.yaml against the storage, then against what was read), short type names, crashed-recorder WAL files.
"""

from __future__ import annotations

# (The docstring is the --help text.) The one-bag tool (tools/bag.py) and the fleet layer (unet_perception/fleet,
# above it) meet only here: imports point cli -> fleet -> bag (test_layering).

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import DEVICES, KINDS
from unet_perception.fleet.plan import REPORT_NAME, one_line
from unet_perception.model_contract import ModelError
from unet_perception.tools.bag import (FORMATS, STORAGES, BagError, bag_from_images, check_label_options,
                                       check_output, label_bag, list_images)
from unet_perception.tools.bag_preflight import check_sqlite_write
from unet_perception.tools.bag_play import play_bag


def _from_images(args: argparse.Namespace) -> int:
    images = list_images(args.dir, args.limit)
    stamps = bag_from_images(images, args.out, topic=args.topic, rate=args.rate, frame_id=args.frame_id,
                             compressed=args.compressed, fmt=args.format, storage=args.storage,
                             encoding=args.encoding)
    print(f"wrote {args.out}: {len(stamps)} frames at {args.rate:g} Hz ({args.storage})")
    return 0


def _label(args: argparse.Namespace) -> int:
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter

    check_label_options(args.alpha, args.batch, args.max_pixels)  # before the model loads: costs nothing
    if args.backend == "tensorrt" and args.device != "cuda":  # the backend refuses it too, in the node's terms
        raise BagError(f"--backend tensorrt runs on CUDA only and --device is {args.device}: add --device cuda "
                       "(and --gpu-id N for a GPU other than 0), or label on the CPU with --backend onnxruntime")
    if args.gpu_id < 0:
        raise BagError(f"--gpu-id must be >= 0, got {args.gpu_id}")
    check_output(args.out)
    model = args.model or _default_model()
    if not Path(model).exists():  # a folder, device or FIFO: read_model_info names it
        raise BagError(f"no model at {model}; pass --model PATH to an exported .onnx (unet-export)")
    options = BackendOptions(max_batch=args.batch, threads=args.threads, device=args.device, gpu_id=args.gpu_id)
    try:
        backend = create_backend(args.backend, model, options)
        backend.activate()
    except BackendError as exc:  # the backends advise in the node's terms ("set device cpu"): say it in this tool's
        raise BackendError(re.sub(r"set device (to )?cpu", "pass --device cpu", str(exc))) from None
    with backend:
        summary = label_bag(args.input, args.out, Segmenter(backend, backend.info.classes), topics=args.topics,
                            storage=args.storage, batch=args.batch, alpha=args.alpha,
                            max_pixels=args.max_pixels, exclude_topics=args.exclude_topics or ())
    print(summary.table())
    print(f"wrote {args.out} (backend {backend.name}, {backend.device})")
    return 0


def _default_model() -> str:
    from unet_perception.launch_support import default_model_path

    return str(default_model_path())


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread between two Python steps (a KeyboardInterrupt, so whatever
    cleans up after Ctrl-C cleans up after it too)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


def _play(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from unet_perception.launch_support import apply_node_env

    # SIGINT and SIGTERM are handled here, not by rclpy: rclpy's handler shuts the context down at once, under a
    # publish that then fails with "publisher's context is invalid" (a traceback, exit 1), and a SIGINT that the
    # shell left ignored (a script's background job) never became a KeyboardInterrupt at all. Here a signal stops
    # play between two Python steps, and the context goes only after the node (as the node's own main does).
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _stopped) for signum in signals}
    sent = 0

    def count(_topic: str, _stamp: int) -> None:
        nonlocal sent
        sent += 1

    node = None
    try:
        apply_node_env()  # before rclpy.init: Fast DDS reads the profile when the participant is created
        rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        node = rclpy.create_node("unet_bag_player")
        stats = play_bag(node, args.bag, rate_factor=args.rate_factor, loop=args.loop, clock=args.clock,
                         topics=args.topics, reliable=args.reliable, wait_for_subscribers=args.wait_for_subscribers,
                         on_publish=count)
    except Stopped as exc:
        print(f"unet-bag play: stopped by {signal.Signals(exc.signum).name} after {sent} messages",
              file=sys.stderr)
        return 128 + exc.signum  # the shell's status for a process a signal ended: 130 for SIGINT, 143 for SIGTERM
    finally:
        for signum in signals:  # the clean-up is not interrupted by a second signal
            signal.signal(signum, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"published {sum(stats.published.values())} messages on {len(stats.published)} topics "
          f"in {stats.seconds:.1f} s")
    return 0


def add_label_options(p: argparse.ArgumentParser) -> None:
    """The model and labelling options ``label`` and ``label-many`` share, with the same names and defaults."""
    p.add_argument("--model", default="", help="ONNX model (default: the package's models/unet_camvid.onnx)")
    p.add_argument("--backend", default="auto", choices=KINDS, help="inference backend (default: %(default)s)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="camera topics to label (default: all)")
    p.add_argument("--storage", choices=sorted(STORAGES), default=None, help="output storage (default: as IN)")
    p.add_argument("--batch", type=int, default=4, help="frames per inference batch (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask, 0..1 "
                   "(default: 0.5)")
    p.add_argument("--exclude-topics", nargs="+", metavar="TOPIC",
                   help="topics to leave out of the output bags entirely (neither copied nor labelled)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="frames with more pixels are skipped as bad input, checked before decoding "
                        "(default: 4096*4096, as the node's max_image_pixels)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-bag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{from-images,label,label-many,play}")

    p = sub.add_parser("from-images", help="make a rosbag2 of camera frames from an image folder",
                       description="Write the images of DIR (name order) as one camera topic into the new bag OUT.")
    p.add_argument("dir", type=Path, metavar="DIR", help="folder of .png/.jpg frames")
    p.add_argument("out", type=Path, metavar="OUT", help="output bag folder (must not exist)")
    p.add_argument("--topic", default="/camera/image_raw", help="camera topic (default: %(default)s)")
    p.add_argument("--rate", type=float, default=10.0, help="frame rate in Hz (default: %(default)s)")
    p.add_argument("--frame-id", default="camera", help="header frame_id (default: %(default)s)")
    p.add_argument("--compressed", action="store_true",
                   help="write sensor_msgs/CompressedImage on <topic>/compressed")
    p.add_argument("--format", choices=sorted(FORMATS), default="jpeg", help="with --compressed (default: jpeg)")
    p.add_argument("--storage", choices=sorted(STORAGES), default="sqlite3", help="(default: %(default)s)")
    p.add_argument("--encoding", choices=("rgb8", "bgr8"), default="rgb8",
                   help="raw Image encoding (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N images only")
    p.set_defaults(func=_from_images)

    p = sub.add_parser("label", help="label every camera topic of a bag offline (no ROS graph)",
                       description="Copy every message of IN to the new bag OUT and add "
                                   "<ns>/segmentation/{labels,color,overlay} (and confidence, for models with that "
                                   "output) for each Image/CompressedImage topic.")
    p.add_argument("input", type=Path, metavar="IN", help="input bag folder (sqlite3 or mcap)")
    p.add_argument("out", type=Path, metavar="OUT", help="output bag folder (must not exist)")
    add_label_options(p)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where inference runs (default: %(default)s, as the node's device parameter); with cuda, "
                        "--backend auto is TensorRT, else ONNX Runtime's CUDA provider; tensorrt needs cuda")
    p.add_argument("--gpu-id", type=int, default=0, metavar="N", help="--device cuda: which GPU (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU inference threads, 0 = library default")
    p.set_defaults(func=_label)

    p = sub.add_parser("play", help="publish a bag over rclpy at its recorded timing",
                       description="Publish BAG's messages at their recorded timing, for machines without "
                                   "`ros2 bag play`. Uses the package's Fast DDS profile for large frames unless "
                                   "FASTRTPS_DEFAULT_PROFILES_FILE is set.")
    p.add_argument("bag", type=Path, metavar="BAG", help="bag folder (sqlite3 or mcap)")
    p.add_argument("--rate-factor", type=float, default=1.0, help="speed factor (default: %(default)s)")
    p.add_argument("--loop", action="store_true", help="play again from the start until Ctrl-C")
    p.add_argument("--clock", action="store_true", help="publish /clock with the bag time (use_sim_time)")
    p.add_argument("--topics", nargs="+", metavar="TOPIC", help="topics to play (default: all)")
    p.add_argument("--reliable", action="store_true", help="reliable QoS instead of sensor-data (best effort)")
    p.add_argument("--wait-for-subscribers", type=float, default=0.0, metavar="SEC",
                   help="wait up to SEC seconds for a subscriber on every topic before playing (default: 0)")
    p.set_defaults(func=_play)

    add_label_many(sub)
    return parser


def add_label_many(sub: Any) -> None:
    """The ``label-many`` subcommand (Ray is imported only when it runs)."""
    p = sub.add_parser("label-many", help="label many bags on Ray (this machine or a cluster), resumable",
                       description="Label every input bag as `unet-bag label` does, on a local Ray or an existing "
                                   "Ray cluster, into DIR/NAME. Bags whose output exists are skipped, so a "
                                   "rerun finishes an interrupted run. Writes DIR/" + REPORT_NAME + ".")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="bag folder, .db3/.mcap file, glob, or a text file listing them (one a line)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the labelled bags")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="existing Ray cluster: auto (this node is in one) or ray://HEAD:10001 "
                        "(default: start a local Ray on this machine)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="workers, each with the model loaded once (default: as many as the CPUs/GPUs hold)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="(default: %(default)s)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G",
                   help="GPUs per worker, e.g. 1 or 0.5 (default: 0, CPU workers with ONNX Runtime)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="times a bag is retried when its worker dies on it (default: %(default)s)")
    add_label_options(p)
    p.add_argument("--threads", type=int, default=0,
                   help="CPU inference threads per worker (default: 0 = --cpus-per-worker)")
    p.set_defaults(func=_label_many)


def _label_many(args: argparse.Namespace) -> int:
    from unet_perception.fleet.driver import label_many, ray_session  # Ray itself only when a run starts
    from unet_perception.fleet.plan import expand_inputs, plan_jobs
    from unet_perception.fleet.worker import LabelSettings
    from unet_perception.model_contract import read_model_info

    check_label_options(args.alpha, args.batch, args.max_pixels)  # before Ray starts: a bad option costs nothing
    if args.backend == "tensorrt" and not args.gpus_per_worker > 0:  # a worker is on cuda when Ray gives it a GPU
        raise BagError("--backend tensorrt runs on CUDA only and label-many's workers get no GPU: add "
                       "--gpus-per-worker 1 (or a share, such as 0.5), or label on CPU workers with --backend "
                       "onnxruntime")
    model = args.model or _default_model()
    if not Path(model).exists():  # a folder, device or FIFO: read_model_info names it
        raise BagError(f"no model at {model}; pass --model PATH to an exported .onnx (unet-export)")
    read_model_info(model)  # a model that cannot be read is one error here, not one per worker
    if args.workers is not None and args.workers < 1:
        raise BagError(f"--workers must be >= 1, got {args.workers}")
    if args.retries < 0:
        raise BagError(f"--retries must be >= 0, got {args.retries}")
    jobs = plan_jobs(expand_inputs(args.inputs, args.out), args.out)
    for job in jobs:  # before Ray starts: rosbags would lose an sqlite3 output whose path has ? # or % (a URI)
        if args.storage == "sqlite3" or args.storage is None and _holds_sqlite3(job.src):
            check_sqlite_write(job.out)
    threads = args.threads or max(1, int(args.cpus_per_worker))
    settings = LabelSettings(str(Path(model).resolve()), args.backend, args.batch, threads, args.alpha,
                             tuple(args.topics) if args.topics else None, args.storage,
                             tuple(args.exclude_topics or ()), args.max_pixels)
    with ray_session(args.ray_address):
        report = label_many(jobs, settings, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                            gpus_per_worker=args.gpus_per_worker, retries=args.retries)
    report.write_json(args.out / REPORT_NAME)
    print(report.table())
    for line in report.workers:
        print(f"worker: {line}")
    print(f"report: {args.out / REPORT_NAME}")
    return 1 if report.count("failed") else 0


def _holds_sqlite3(bag: Path) -> bool:
    """Whether ``bag`` (a folder or a storage file) is an sqlite3 bag, so its output is one too by default."""
    if bag.is_file():
        return ".db3" in bag.name
    try:
        return any(".db3" in name for name in os.listdir(bag))
    except OSError:
        return False  # label_bag says what is wrong with it


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (BagError, BackendError, ModelError, OSError) as exc:  # OSError: an unreadable file, a vanished folder
        print(f"unet-bag {args.command}: error: {one_line(str(exc))}", file=sys.stderr)  # one line, no traceback
        return 1
    except KeyboardInterrupt:
        print(f"unet-bag {args.command}: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
