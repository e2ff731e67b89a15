"""The one-bag tool behind ``unet-bag``: make, label and play rosbag2 files without the ``ros2`` CLI.

* ``bag_from_images``: an image folder -> a rosbag2 of ``sensor_msgs/Image`` or ``CompressedImage``.
* ``label_bag``: every camera topic of a bag through the segmentation pipeline (no ROS graph) -> a new bag
  with the original messages plus ``<ns>/segmentation/{labels,color,overlay}`` (and ``confidence`` for models
  with that output) at the same timestamps.
* reading (``open_bag``, ``read_messages``) for ``play_bag`` (``bag_play``), which publishes a bag over rclpy.

Bags are read and written with ``rosbags`` (sqlite3 and mcap, rosbag2 format version 8 as ROS 2 Jazzy writes
it) and the ROS 2 Jazzy message definitions, so ``ros2 bag info``/``play`` and rviz read what we write.
Outputs are written into a hidden staging folder and renamed into place only when complete. Bags are read as their
storage files hold them (``bag_read``: any type spelling, counts from the storage). What can be checked is checked
before the work (``bag_preflight``): the output path and its free space, the input's message counts (metadata.yaml
against the storage, then the storage against what was read), crashed-recorder WAL files.
This module knows one bag at a time: the fleet (``unet_perception/fleet``) uses it, never the other way round,
and the ``unet-bag`` command line lives in ``tools/bag_cli.py``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from rosbags.interfaces import Connection, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, StoragePlugin, Writer, WriterError
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore
from tqdm import tqdm  # type: ignore[import-untyped]

from unet_perception.image_files import IMAGE_SUFFIXES, list_image_files
from unet_perception.node_stats import check_stamp
from unet_perception.tools.bag_preflight import (BagError, ReadableBag, check_output, check_read, check_sqlite_read,
                                                 check_sqlite_write, compare_counts, readable_bag, remove_dead_runs,
                                                 run_prefix)
from unet_perception.tools.bag_read import StoredBag
from unet_perception.topics import camera_outputs, is_compressed_topic, output_kinds, output_topics

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
CAMERA_TYPES = (IMAGE, COMPRESSED)
BAG_VERSION: Literal[8] = 8  # the rosbag2 format ROS 2 Jazzy writes; Jazzy's reader does not know version 9
STORAGES = {"sqlite3": StoragePlugin.SQLITE3, "mcap": StoragePlugin.MCAP}
FORMATS = {"jpeg": ".jpg", "png": ".png"}

__all__ = ["BagError", "bag_from_images", "label_bag", "open_bag"]  # BagError lives in bag_preflight


def typestore() -> Typestore:
    """The ROS 2 Jazzy message definitions (the ones ``ros2 bag`` and rviz on Jazzy expect)."""
    return get_typestore(Stores.ROS2_JAZZY)


def stamp_msg(store: Typestore, ns: int) -> Any:
    """A ``builtin_interfaces/Time`` for ``ns`` nanoseconds since the epoch."""
    return store.types["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


# ---------------------------------------------------------------------------------------------- reading


@contextmanager
def open_checked(path: Path, scratch: Path | None = None,
                 info: Callable[[str], None] = tqdm.write) -> Iterator[tuple[StoredBag, ReadableBag]]:
    """All of ``path`` as its storage holds it (-wal files repaired in a scratch folder inside ``scratch``, see
    ``bag_preflight``), its counts checked against metadata.yaml, or a ``BagError`` that names the bag and the
    problem. A full read must yield ``stored()`` of the ``StoredBag``."""
    if not path.exists():
        raise BagError(f"no bag at {path}; give a bag folder (with metadata.yaml) or its .db3/.mcap file")
    check_sqlite_read(path)
    with readable_bag(path, scratch, info) as readable:
        check_sqlite_read(path, readable.path)
        try:
            reader = Reader(readable.path)
            reader.open()
        except FileNotFoundError as exc:  # a folder without metadata.yaml (a recorder that was killed)
            raise BagError(f"cannot open the bag {path}: it has no metadata.yaml; give one of its .db3/.mcap "
                           "files, or rebuild metadata.yaml with `ros2 bag reindex`") from exc
        except Exception as exc:  # rosbags raises ReaderError, sqlite3 and YAML errors for broken bags
            raise BagError(f"cannot open the bag {path}: {type(exc).__name__}: {exc}".rstrip(".") + "; is it a "
                           "complete rosbag2 folder (metadata.yaml plus its .db3 or .mcap files)?") from exc
        try:
            stored = StoredBag(reader, path)
            compare_counts(path, stored.listed, stored.stored(), info)
            if stored.message_count == 0:
                raise BagError(f"the bag {path} has no messages; record or make one with data "
                               "(unet-bag from-images DIR OUT)")
            yield stored, readable
        finally:
            reader.close()


@contextmanager
def open_bag(path: Path, scratch: Path | None = None,
             info: Callable[[str], None] = tqdm.write) -> Iterator[StoredBag]:
    """``open_checked`` without the repair details: all of ``path`` as its storage holds it, or a ``BagError``."""
    with open_checked(path, scratch, info) as (reader, _):
        yield reader


def read_messages(reader: StoredBag,
                  connections: Sequence[Connection] = ()) -> Iterator[tuple[Connection, int, bytes]]:
    """``reader.messages()`` with storage-level failures (a truncated or corrupt file) turned into ``BagError``."""
    try:
        yield from reader.messages(connections)
    except Exception as exc:  # ReaderError, apsw errors, struct/zstd errors of a damaged file
        raise BagError(f"the bag {reader.path} is damaged and cannot be read to the end: "
                       f"{type(exc).__name__}: {exc}") from exc


def select_connections(reader: StoredBag, topics: Sequence[str] | None) -> list[Connection]:
    """The connections of ``topics`` (all when None), refusing names the bag does not have."""
    if not topics:
        return list(reader.connections)
    known = {c.topic for c in reader.connections}
    missing = sorted(set(topics) - known)
    if missing:
        raise BagError(f"topics {missing} are not in the bag; it has {sorted(known)}")
    return [c for c in reader.connections if c.topic in topics]


# ---------------------------------------------------------------------------------------------- writing


@contextmanager
def staged_writer(out: Path, storage: str, need_bytes: int = 0) -> Iterator[Writer]:
    """A Writer that writes into a hidden staging folder beside ``out`` and moves it to ``out`` only on success.

    A run that fails or is interrupted leaves nothing at ``out``, so a half-written bag never looks complete; what
    a killed run left for ``out`` is removed first (``remove_dead_runs``). ``out`` is checked first
    (``check_output``: a new path, a writable folder, ``need_bytes`` free).
    """
    if storage not in STORAGES:
        raise BagError(f"storage must be one of {sorted(STORAGES)}, got '{storage}'")
    if storage == "sqlite3":
        check_sqlite_write(out)
    remove_dead_runs(out.parent, run_prefix(out.name, "partial"), tqdm.write)  # first: it may free the space
    check_output(out, need_bytes)
    staging = Path(tempfile.mkdtemp(prefix=run_prefix(out.name, "partial", os.getpid()), dir=out.parent))
    writer = Writer(staging / out.name, version=BAG_VERSION, storage_plugin=STORAGES[storage])
    try:
        writer.open()
        yield writer
        writer.close()
        os.rename(staging / out.name, out)
    except BaseException as exc:
        try:
            writer.abort()
        except Exception:  # noqa: BLE001, S110 - a full disk can fail the abort too; the staging folder goes below
            pass
        if isinstance(exc, OSError | sqlite3.Error | WriterError):  # a disk that filled up after the check
            raise BagError(f"writing {out} failed: {type(exc).__name__}: {exc}; nothing was left at {out}") from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_connection(writer: Writer, conn: Connection, store: Typestore) -> Connection:
    """The same topic, type, definition and offered QoS in ``writer``.

    A definition without a type hash (metadata version 5 and older) gets the hash of that definition. Bags from
    older ROS distributions carry no definitions (or ones rosbags cannot parse, such as a type without its
    dependencies): Jazzy's are filled in for the types it knows.
    """
    msgdef, digest, msgtype = conn.msgdef.data, conn.digest, conn.msgtype
    known = conn.msgdef.format != MessageDefinitionFormat.NONE
    if known and not msgdef.strip() and digest and _definition_hash(conn) != digest:
        known = False  # an empty text with another type's hash: the recorder had no definition to store
    if known and not digest:
        digest = _definition_hash(conn)
    if not known or not digest:
        if msgtype not in store.types:
            raise BagError(f"unknown message type '{msgtype}' on topic {conn.topic}: the bag carries no "
                           "definition of it that can be read and ROS 2 Jazzy does not define it; leave the topic "
                           f"out with --exclude-topics {conn.topic}, or re-record the bag with a ROS 2 that stores "
                           "definitions (Iron or later)")
        msgdef = store.generate_msgdef(msgtype, ros_version=2)[0]
        digest = store.hash_rihs01(msgtype)
    ext = conn.ext
    return writer.add_connection(conn.topic, msgtype, msgdef=msgdef, rihs01=digest,
                                 serialization_format=ext.serialization_format,  # type: ignore[union-attr]
                                 offered_qos_profiles=ext.offered_qos_profiles)  # type: ignore[union-attr]


def _definition_hash(conn: Connection) -> str:
    """RIHS01 of the definition the bag carries for ``conn``, or "" when rosbags cannot read it alone."""
    try:
        types = (get_types_from_idl(conn.msgdef.data) if conn.msgdef.format == MessageDefinitionFormat.IDL
                 else get_types_from_msg(conn.msgdef.data, conn.msgtype))
        scratch = get_typestore(Stores.EMPTY)
        scratch.register(types)
        return scratch.hash_rihs01(conn.msgtype)
    except Exception:  # noqa: BLE001 - unparsable, or a dependency the definition leaves out
        return ""


# ---------------------------------------------------------------------------------------------- from-images


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` in name order (at most ``limit``)."""
    if limit is not None and limit < 1:  # 0 took every image and -1 all but the last
        raise BagError(f"--limit must be >= 1 (the first N images), got {limit}")
    if not folder.is_dir():
        raise BagError(f"image folder {folder} does not exist; give a folder of .png/.jpg frames")
    files = list_image_files(folder)
    if not files:
        raise BagError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit else files


def bag_from_images(images: Sequence[Path], out: Path, *, topic: str = "/camera/image_raw", rate: float = 10.0,
                    frame_id: str = "camera", compressed: bool = False, fmt: str = "jpeg",
                    storage: str = "sqlite3", encoding: str = "rgb8", start_ns: int | None = None,
                    progress: bool = True) -> list[int]:
    """Write ``images`` as one camera topic at ``rate`` Hz; returns each frame's stamp (ns), in order.

    Header stamps equal the bag timestamps: ``start_ns`` (default: now) plus ``i / rate`` seconds.
    With ``compressed`` the topic gets a ``/compressed`` suffix (image_transport's rule) and the frames are
    ``fmt`` (jpeg or png) with an image_transport style format string.
    """
    if not 0 < rate < float("inf"):  # nan failed round(1e9 / rate) with a traceback, inf stamped every frame alike
        raise BagError(f"--rate must be > 0 Hz and finite, got {rate}")
    if encoding not in ("rgb8", "bgr8"):
        raise BagError(f"--encoding must be rgb8 or bgr8, got '{encoding}'")
    if fmt not in FORMATS:
        raise BagError(f"--format must be one of {sorted(FORMATS)}, got '{fmt}'")
    if compressed and not is_compressed_topic(topic):
        topic = topic.rstrip("/") + "/compressed"
    store = typestore()
    msgtype = COMPRESSED if compressed else IMAGE
    start_ns = time.time_ns() if start_ns is None else start_ns
    period_ns = round(1e9 / rate)
    stamps = []
    with staged_writer(out, storage) as writer:
        conn = writer.add_connection(topic, msgtype, typestore=store)
        for i, path in enumerate(tqdm(images, desc=f"{out.name}", unit="frame", disable=not progress)):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise BagError(f"cannot read {path} as an image; remove it from the folder or convert it")
            ns = start_ns + i * period_ns
            header = store.types["std_msgs/msg/Header"](stamp=stamp_msg(store, ns), frame_id=frame_id)
            if compressed:
                ok, buf = cv2.imencode(FORMATS[fmt], bgr)
                assert ok, f"OpenCV failed to encode {path} as {fmt}"
                msg = store.types[COMPRESSED](header=header, format=f"bgr8; {fmt} compressed bgr8",
                                              data=buf.reshape(-1))
            else:
                pixels = bgr if encoding == "bgr8" else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                msg = image_message(store, pixels, encoding, header)
            writer.write(conn, ns, store.serialize_cdr(msg, msgtype))
            stamps.append(ns)
    return stamps


# ---------------------------------------------------------------------------------------------- label


@dataclass
class LabelSummary:
    """What ``label_bag`` did."""

    frames: Counter[str] = field(default_factory=Counter)   # labelled frames per input topic
    errors: list[str] = field(default_factory=list)           # one line per skipped message
    copied: int = 0                                           # original messages written
    seconds: float = 0.0
    metadata_count: int | None = None                         # messages metadata.yaml lists (None: no such file)
    storage_count: int = 0                                    # messages the storage holds
    recovered: int = 0                                        # of them, only in a crashed recorder's -wal file

    @property
    def fps(self) -> float:
        return sum(self.frames.values()) / self.seconds if self.seconds > 0 else 0.0

    def table(self) -> str:
        rows = [f"{'topic':40s} {'frames':>7s}"] + [f"{t:40s} {n:7d}" for t, n in sorted(self.frames.items())]
        listed = "no metadata.yaml" if self.metadata_count is None else f"metadata.yaml lists {self.metadata_count}"
        rows.append(f"messages: {listed}, the storage holds {self.storage_count}"
                    + (f" ({self.recovered} recovered from -wal)" if self.recovered else "")
                    + f", {self.copied} read and copied")
        rows.append(f"total: {sum(self.frames.values())} frames labelled in {self.seconds:.1f} s "
                    f"({self.fps:.1f} fps), {self.copied} original messages copied, {len(self.errors)} errors")
        return "\n".join(rows)


@dataclass
class _Pending:
    conn: Connection
    timestamp: int
    header: Any
    rgb: np.ndarray
    overlay_encoding: str


def camera_connections(reader: StoredBag, topics: Sequence[str] | None) -> list[Connection]:
    """The Image/CompressedImage connections to label: all of them (none for a bag without cameras), or exactly
    ``topics``."""
    chosen = select_connections(reader, topics)
    if topics:
        wrong = sorted({f"{c.topic} ({c.msgtype})" for c in chosen if c.msgtype not in CAMERA_TYPES})
        if wrong:
            raise BagError(f"topics {wrong} are not sensor_msgs/msg/Image or CompressedImage; label only "
                           "camera topics")
    return [c for c in chosen if c.msgtype in CAMERA_TYPES]


def _output_plan(reader: StoredBag, cameras: Sequence[Connection],
                 kinds: Sequence[str]) -> dict[str, dict[str, str]]:
    """Camera topic -> {kind: output topic}, by the node's rule; BagError for cameras sharing outputs and for
    camera topics whose names are no valid ROS 2 names (their outputs would not be either)."""
    from rclpy.exceptions import InvalidTopicNameException
    from rclpy.validate_topic_name import validate_topic_name

    for c in cameras:
        try:
            validate_topic_name(c.topic)
        except InvalidTopicNameException as exc:
            reason = str(exc).splitlines()[0].removeprefix("Invalid topic name: ").rstrip(":")
            raise BagError(f"camera topic '{c.topic}' is not a valid ROS 2 topic name ({reason}), nor would its "
                           f"outputs be; leave it out with --exclude-topics {shlex.quote(c.topic)}, or rename it in "
                           "the bag") from exc
    try:
        camera_outputs(c.topic for c in cameras)
    except ValueError as exc:
        raise BagError(f"{exc}; label them one at a time (--topics TOPIC), or remap them apart first") from exc
    plan = {c.topic: output_topics(c.topic, kinds) for c in cameras}
    clash = sorted({t for names in plan.values() for t in names.values()} & {c.topic for c in reader.connections})
    if clash:
        raise BagError(f"the bag already has {clash}; label only the raw camera topics (--topics) or start from "
                       "the unlabelled bag")
    return plan


SAMPLE_FRAMES = 16       # frames per camera the output-size estimate looks at
PIXELS_PER_BYTE = 1024   # compressed frames: an upper bound of the decoded pixels per byte of data (a black PNG)


def _frame_pixels(reader: StoredBag, conn: Connection, store: Typestore, max_pixels: int) -> int:
    """The largest frame (pixels) among a camera's first ``SAMPLE_FRAMES`` frames that pass ``codec.check``.

    Sizes are bounded by each message's own data (a raw frame that passes holds ``height * step`` bytes; a
    compressed one at most ``PIXELS_PER_BYTE`` pixels per byte), so a header that lies refuses no bag.
    """
    from unet_perception.codec import check, check_compressed, is_compressed

    largest = 0
    for i, (_, _, raw) in enumerate(read_messages(reader, [conn])):
        if i == SAMPLE_FRAMES:
            break
        try:
            msg: Any = store.deserialize_cdr(raw, conn.msgtype)
            check(msg, max_pixels)
            if is_compressed(msg):
                height, width = check_compressed(msg, max_pixels)[2]
                pixels = min(height * width, len(msg.data) * PIXELS_PER_BYTE)
            else:
                pixels = int(msg.height) * int(msg.width)
        except Exception:  # noqa: BLE001 - a bad frame is skipped later; it makes no output
            continue
        largest = max(largest, pixels)
    return largest


def _bag_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
    return sum(f.stat().st_size for f in files)


def check_label_options(alpha: float, batch: int, max_pixels: int | None) -> None:
    """``--alpha``, ``--batch`` and ``--max-pixels`` of label (and label-many), or a ``BagError`` naming the option."""
    from unet_perception.pipeline import check_alpha

    try:
        check_alpha(alpha)
    except ValueError as exc:
        raise BagError(f"--alpha: {exc}") from exc
    if batch < 1:
        raise BagError(f"--batch must be >= 1, got {batch}")
    if max_pixels is not None and max_pixels < 1:
        raise BagError(f"--max-pixels must be >= 1, got {max_pixels} (leave it out for the default 4096*4096)")


def label_bag(src: Path, out: Path, segmenter: Any, *, topics: Sequence[str] | None = None,
              storage: str | None = None, batch: int = 4, alpha: float = 0.5, max_pixels: int | None = None,
              exclude_topics: Sequence[str] = (), progress: bool = True, log: Callable[[str], None] = tqdm.write,
              info: Callable[[str], None] = tqdm.write) -> LabelSummary:
    """Copy every message of ``src`` to ``out`` and add segmentation topics for its camera topics.

    ``segmenter`` is a ``pipeline.Segmenter``; decode, render and encode are the node's (``codec.decode``,
    ``Segmenter.render``). Outputs carry the input's header and bag timestamp; ``confidence`` is written for
    models that have it. A camera message that cannot be decoded is copied as is, reported through ``log`` (one
    line each) and gets no outputs. ``exclude_topics`` are neither copied nor labelled. Notices (messages
    recovered from a -wal file, a stale metadata.yaml) go to ``info``.

    Checked before any work, each a ``BagError``: ``alpha``, ``batch``, ``storage``, ``out`` (new path, writable
    folder, free space for the estimated output), the topics, output collisions, and the input's message counts
    (metadata.yaml against the storage); after the work, that every message was read.
    """
    from unet_perception.codec import MAX_PIXELS, decode, overlay_encoding, source_encoding

    check_label_options(alpha, batch, max_pixels)
    if storage is not None and storage not in STORAGES:
        raise BagError(f"storage must be one of {sorted(STORAGES)}, got '{storage}'")
    check_output(out)
    max_pixels = max_pixels or MAX_PIXELS
    store = typestore()
    summary = LabelSummary()
    started = time.perf_counter()
    with open_checked(src, out.parent, info) as (reader, readable):
        expected = reader.stored()
        summary.storage_count, summary.recovered = sum(expected.values()), readable.recovered
        summary.metadata_count = None if reader.listed is None else sum(reader.listed.values())
        excluded = set(exclude_topics)
        if excluded - set(expected):
            raise BagError(f"--exclude-topics {sorted(excluded - set(expected))} are not in the bag; "
                           f"it has {sorted(expected)}")
        kept = [c for c in reader.connections if c.topic not in excluded]
        if not kept:
            raise BagError("--exclude-topics leaves no topic to copy")
        if topics and excluded & set(topics):
            raise BagError(f"topics {sorted(excluded & set(topics))} are both labelled and excluded")
        cameras = [c for c in camera_connections(reader, topics) if c.topic not in excluded]
        if not cameras:
            found = ", ".join(sorted({f"{c.topic} ({c.msgtype})" for c in kept}))
            info(f"{src} has no sensor_msgs/msg/Image or CompressedImage topic ({found}): nothing to label; "
                 f"{out} is a copy of its {sum(c.msgcount for c in kept)} messages")
        has_confidence = bool(getattr(getattr(segmenter.backend, "info", None), "has_confidence", False))
        kinds = output_kinds(has_confidence)
        plan = _output_plan(reader, cameras, kinds)
        per_pixel = len(kinds) * 3  # bytes per pixel of the outputs (an upper bound: rgb8 at most)
        need = _bag_bytes(readable.path) + sum(
            c.msgcount * (400 + per_pixel * _frame_pixels(reader, c, store, max_pixels)) for c in cameras)
        with staged_writer(out, storage or reader.storage_name, need) as writer:
            copies = {c.id: copy_connection(writer, c, store) for c in kept}  # StoredBag: one per topic and type
            outputs = {t: {k: writer.add_connection(name, IMAGE, typestore=store) for k, name in names.items()}
                       for t, names in plan.items()}
            camera_ids = {c.id for c in cameras}
            pending: list[_Pending] = []
            read: Counter[str] = Counter()

            def flush() -> None:
                try:
                    results = segmenter.run([p.rgb for p in pending])
                except ValueError as exc:  # a model whose labels break its own metadata: no bag can be right
                    raise BagError(f"model: {exc}; re-export it with unet-export") from exc
                for p, seg in zip(pending, results, strict=True):
                    images = segmenter.render(p.rgb, seg, kinds, alpha=alpha, overlay_encoding=p.overlay_encoding)
                    for kind, (array, enc) in images.items():
                        writer.write(outputs[p.conn.topic][kind], p.timestamp, store.serialize_cdr(
                            image_message(store, array, enc, p.header), IMAGE))
                    summary.frames[p.conn.topic] += 1
                pending.clear()

            with tqdm(total=sum(expected[c.topic] for c in kept), desc=out.name, unit="msg",
                      disable=not progress) as bar:
                for conn, timestamp, raw in read_messages(reader, kept):
                    writer.write(copies[conn.id], timestamp, raw)
                    summary.copied += 1
                    read[conn.topic] += 1
                    bar.update()
                    if conn.id not in camera_ids:
                        continue
                    try:
                        msg: Any = store.deserialize_cdr(raw, conn.msgtype)
                        check_stamp(msg.header.stamp)  # as the node: outputs would carry an invalid time
                        rgb = decode(msg, max_pixels)
                    except Exception as exc:  # noqa: BLE001 - CodecError, or anything a corrupt CDR payload raises
                        line = f"skipped {conn.topic} at {timestamp}: {type(exc).__name__}: {exc}"
                        summary.errors.append(line)
                        log(line)
                        continue
                    pending.append(_Pending(conn, timestamp, msg.header, rgb, overlay_encoding(source_encoding(msg))))
                    if len(pending) >= batch:
                        flush()
                if pending:
                    flush()
            check_read(src, Counter({t: n for t, n in expected.items() if t not in excluded}), read)
            _check_labelled(cameras, read, summary)  # inside the writer: a failed bag leaves nothing at out
    summary.seconds = time.perf_counter() - started
    return summary


def _check_labelled(cameras: Sequence[Connection], read: Counter[str], summary: LabelSummary) -> None:
    """BagError for a camera topic with messages of which not one was labelled, with the first reason."""
    for topic in sorted({c.topic for c in cameras}):
        if read[topic] and not summary.frames[topic]:
            first = next((e for e in summary.errors if e.startswith(f"skipped {topic} at ")), "")
            raise BagError(f"no frame of {topic} could be labelled: all {read[topic]} were refused (first: "
                           f"{first.removeprefix('skipped ')}); nothing was written. Fix the camera's "
                           f"encoding, or leave the topic out with --exclude-topics {topic}")


def image_message(store: Typestore, array: np.ndarray, encoding: str, header: Any) -> Any:
    """A rosbags ``sensor_msgs/Image`` holding ``array`` (mono8 [H, W] or rgb8/bgr8 [H, W, 3])."""
    array = np.ascontiguousarray(array)
    return store.types[IMAGE](header=header, height=array.shape[0], width=array.shape[1], encoding=encoding,
                              is_bigendian=0, step=array.strides[0], data=array.reshape(-1))
