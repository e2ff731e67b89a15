"""A real rclpy graph for tests: its own Context and executor thread, topic collectors, explicit timeouts.

Each RosGraph has its own rclpy Context, so tests never share global rclpy state with other test
modules; conftest.py has already given the pytest process its own ROS domain.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data

from unet_perception.launch_support import node_command, node_env

TIMEOUT_S = 20.0  # generous: the 2-core CI machine also trains a model


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT_S, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class Collector:
    """Keeps every message received on one topic."""

    def __init__(self, node: Node, msg_type: Any, topic: str, qos: Any = qos_profile_sensor_data) -> None:
        self.topic = topic
        self.messages: list[Any] = []
        self._lock = threading.Lock()
        self.subscription = node.create_subscription(msg_type, topic, self._on_message, qos)

    def _on_message(self, msg: Any) -> None:
        with self._lock:
            self.messages.append(msg)

    def __len__(self) -> int:
        with self._lock:
            return len(self.messages)

    def wait_for(self, count: int, timeout: float = TIMEOUT_S) -> list[Any]:
        wait_until(lambda: len(self) >= count, timeout, f"{count} messages on {self.topic}")
        with self._lock:
            return list(self.messages)


class RosGraph:
    """Context manager: an initialised Context, a multi-threaded executor spinning in a thread, a test node."""

    def __init__(self) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.node = Node("test_probe", context=self.context)
        self.executor.add_node(self.node)
        self._nodes: list[Node] = [self.node]
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def add(self, node: Node) -> Node:
        self._nodes.append(node)
        self.executor.add_node(node)
        return node

    def segmentation_node(self, namespace: str = "", ros_args: Sequence[str] = (), **params: Any) -> Any:
        """A SegmentationNode in this graph: ``params`` as parameter overrides, ``ros_args`` as its own
        command-line ``--ros-args`` (remapping rules, e.g. ``["-r", "image_raw:=/camera/image_raw"]``)."""
        from unet_perception.node import SegmentationNode

        overrides = [Parameter(k, value=v) for k, v in params.items()]
        cli_args = ["--ros-args", *ros_args] if ros_args else None
        return self.add(SegmentationNode(context=self.context, parameter_overrides=overrides,
                                         namespace=namespace, cli_args=cli_args))

    def collect(self, msg_type: Any, topic: str, qos: Any = qos_profile_sensor_data) -> Collector:
        return Collector(self.node, msg_type, topic, qos)

    def publisher(self, msg_type: Any, topic: str, qos: Any = qos_profile_sensor_data) -> Any:
        return self.node.create_publisher(msg_type, topic, qos)

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=5)  # before any node goes: a spin still in flight would touch destroyed handles
        for node in reversed(self._nodes):
            node.destroy_node()
        rclpy.try_shutdown(context=self.context)

    def __enter__(self) -> RosGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_matched(publisher: Any, collectors: Sequence[Collector], timeout: float = TIMEOUT_S) -> None:
    """Wait until ``publisher`` has a subscriber and every collector hears a publisher."""
    wait_until(lambda: publisher.get_subscription_count() > 0
               and all(c.subscription.get_publisher_count() > 0 for c in collectors),
               timeout, f"discovery of {publisher.topic_name} and {[c.topic for c in collectors]}")


def publish_until(publisher: Any, msg: Any, collector: Collector, count: int = 1,
                  timeout: float = TIMEOUT_S) -> list[Any]:
    """Publish ``msg`` every 0.5 s until ``collector`` holds ``count`` messages.

    Across processes a best-effort sample sent right after matching can be lost, because the reader
    may not have matched the writer yet (discovery is not symmetric in time).
    """
    deadline = time.monotonic() + timeout
    while len(collector) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {count} messages on "
                                 f"{collector.topic}")
        publisher.publish(msg)
        resend = time.monotonic() + 0.5
        while len(collector) < count and time.monotonic() < resend:
            time.sleep(0.01)
    return collector.wait_for(count)


def start_node_process(params: dict[str, Any], params_file: str | Path | None = None,
                       env: dict[str, str] | None = None) -> subprocess.Popen:
    """The real CLI (``python -m unet_perception.node --ros-args --params-file ... -p ...``) as a subprocess."""
    return subprocess.Popen(node_command(params_file, params), env=env or (os.environ | node_env()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextmanager
def output_on_failure(proc: subprocess.Popen) -> Iterator[None]:
    """Around a test body that talks to ``proc``: a failure stops the process and carries its output, so a node
    that died or hung at start shows why, not only as a service or topic that never appeared."""
    try:
        yield
    except BaseException as exc:
        try:
            out = stop_process(proc)
        except AssertionError as stop_error:
            out = str(stop_error)
        raise AssertionError(f"{exc}\n--- the node process (exit {proc.returncode}) printed ---\n{out}") from exc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """Ctrl-C the process, wait for it, and return its output; raises if it does not exit cleanly."""
    if proc.poll() is None:
        proc.send_signal(2)  # SIGINT, as Ctrl-C
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"process did not exit within {timeout} s of Ctrl-C:\n{out}") from None
    return out
