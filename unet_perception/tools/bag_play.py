"""``play_bag``: publish a rosbag2 over rclpy at its recorded timing, for machines without ``ros2 bag play``.

The bag is read as ``bag.open_bag`` reads it (as its storage holds it, counts checked before); messages go out
serialized as recorded, one publisher per topic of that topic's one type, and what was published is checked
against the storage's counts after each pass.
"""

from __future__ import annotations

import importlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rosbags.interfaces import Connection
from tqdm import tqdm  # type: ignore[import-untyped]

from unet_perception.tools.bag import open_bag, read_messages, select_connections
from unet_perception.tools.bag_preflight import BagError, check_read, full_type

DISCOVERY_SETTLE_S = 0.5  # wait_for_subscribers: after the publishers see their subscribers, before the first message


@dataclass
class PlayStats:
    """What ``play_bag`` published."""

    published: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    loops: int = 0


def message_class(msgtype: str, topic: str) -> type:
    """The rclpy message class of ``pkg/msg/Name``, or a ``BagError`` saying which package is missing."""
    pkg, _, name = full_type(msgtype).rpartition("/")
    try:
        return getattr(importlib.import_module(pkg.replace("/", ".")), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise BagError(f"unknown message type '{msgtype}' on topic {topic}: its Python package is not "
                       f"installed here ({exc}); install it (ros-jazzy-{pkg.split('/')[0].replace('_', '-')}) "
                       "or leave the topic out with --topics") from exc


def play_bag(node: Any, path: Path, *, rate_factor: float = 1.0, loop: bool = False, clock: bool = False,
             clock_hz: float = 40.0, topics: Sequence[str] | None = None, reliable: bool = False,
             wait_for_subscribers: float = 0.0, progress: bool = True,
             on_publish: Callable[[str, int], None] | None = None,
             should_stop: Callable[[], bool] = lambda: False) -> PlayStats:
    """Publish ``path``'s messages from ``node`` (an rclpy Node) at their recorded spacing / ``rate_factor``.

    Messages go out serialized as recorded (no decode). Call ``launch_support.apply_node_env()`` before
    ``rclpy.init`` so frames over 512 KiB reach other processes. ``wait_for_subscribers`` seconds: wait until every
    topic has a subscriber, and ``DISCOVERY_SETTLE_S`` more, before the first message (0: start at once, as
    ``ros2 bag play`` does).
    ``clock`` publishes ``/clock`` with the bag time at ``clock_hz`` and before every message.
    """
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock  # type: ignore[import-untyped]

    if not rate_factor > 0:  # nan too
        raise BagError(f"--rate-factor must be > 0, got {rate_factor}")
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE) if reliable else qos_profile_sensor_data
    stats = PlayStats()
    with open_bag(path) as reader:
        conns = select_connections(reader, topics)
        publishers = _publishers(node, conns, qos)
        clock_pub = node.create_publisher(Clock, "/clock", 10) if clock else None
        deadline = time.monotonic() + wait_for_subscribers
        while (wait_for_subscribers > 0 and time.monotonic() < deadline and not should_stop()
               and any(p.get_subscription_count() == 0 for p in publishers.values())):
            time.sleep(0.05)
        if wait_for_subscribers > 0 and all(p.get_subscription_count() for p in publishers.values()):
            # This side's match can come before the subscriber's: a best-effort message sent at once may find the
            # subscriber not yet listening and is lost (the demo's first frame was, once, on a loaded machine).
            time.sleep(DISCOVERY_SETTLE_S)
        total = sum(c.msgcount for c in conns)
        started = time.monotonic()
        while True:
            wall0, bag0 = time.monotonic(), None
            sent: Counter[str] = Counter()
            # closed on the way out too, so a line printed after an interrupt starts on a line of its own
            with tqdm(total=total, desc=path.name, unit="msg", disable=not progress) as bar:
                for conn, timestamp, raw in read_messages(reader, conns):
                    if should_stop():
                        break
                    bag0 = timestamp if bag0 is None else bag0
                    due = wall0 + (timestamp - bag0) / 1e9 / rate_factor
                    while (now := time.monotonic()) < due:
                        if clock_pub is not None:
                            clock_pub.publish(Clock(clock=_ros_time(bag0 + int((now - wall0) * rate_factor * 1e9))))
                        time.sleep(min(due - now, 1.0 / clock_hz))
                    if clock_pub is not None:
                        clock_pub.publish(Clock(clock=_ros_time(timestamp)))
                    publishers[conn.topic].publish(bytes(raw))
                    if on_publish is not None:
                        on_publish(conn.topic, timestamp)
                    stats.published[conn.topic] += 1
                    sent[conn.topic] += 1
                    bar.update()
            if not should_stop():
                check_read(path, Counter({c.topic: c.msgcount for c in conns}), sent)
            stats.loops += 1
            if not loop or should_stop():
                break
    stats.seconds = time.monotonic() - started
    return stats


def _publishers(node: Any, conns: Sequence[Connection], qos: Any) -> dict[str, Any]:
    """Topic -> publisher of its type; a ``BagError`` for a topic recorded with two types (one node cannot offer
    one topic name with two types, and a message must never go out under another type) or a name rclpy refuses."""
    types: dict[str, list[str]] = {}
    for c in conns:
        types.setdefault(c.topic, []).append(c.msgtype)
    mixed = {t: names for t, names in types.items() if len(names) > 1}
    if mixed:
        topic, names = next(iter(sorted(mixed.items())))
        raise BagError(f"topic {topic} was recorded with {len(names)} types ({', '.join(names)}); play cannot "
                       "publish one topic with two types; leave it out with --topics (the other topics)")
    publishers = {}
    for c in conns:
        cls = message_class(c.msgtype, c.topic)
        try:
            publishers[c.topic] = node.create_publisher(cls, c.topic, qos)
        except Exception as exc:  # noqa: BLE001 - InvalidTopicNameException, ValueError, RCLError: one line each
            reason = str(exc).splitlines()[0].rstrip(":")
            raise BagError(f"cannot publish topic '{c.topic}': {reason}; leave it out with --topics "
                           "(the other topics)") from exc
    return publishers


def _ros_time(ns: int) -> Any:
    from builtin_interfaces.msg import Time  # type: ignore[import-untyped]

    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
