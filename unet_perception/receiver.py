"""Camera frames taken by a thread of their own instead of rclpy's executor.

rclpy's Python executor spends about 2.5 core-ms on every message it hands to a callback (it rebuilds its wait
set, makes a task, runs it), and a camera node receives every frame, also those keep-latest later drops: at 4 x 30 Hz
that was a quarter of a core before any frame was inferred. ``FrameReceiver`` waits on the image subscriptions
alone and takes each message as CDR bytes: 0.85 core-ms per 640x480 frame, Fast DDS's own work included
(docs/performance.md). The subscriptions stay ordinary ones of the node (names, QoS, graph, destroy); their callback
group, :class:`TakenByReceiver`, only keeps the executor away from them. Their QoS event handlers (rclpy's default
ones warn of a publisher with incompatible QoS) run in the receiver's thread.

The wait set is rclpy's own (``_rclpy.WaitSet``, the one ``rclpy.wait_for_message`` uses): private API of rclpy,
checked against the Jazzy wheels by the tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, cast

from rclpy.callback_groups import CallbackGroup
from rclpy.context import Context
from rclpy.event_handler import EventHandler
from rclpy.guard_condition import GuardCondition
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.subscription import Subscription

ERROR_PAUSE_S = 0.05  # after a take fails: the subscription stays ready, so retrying at once would spin a core
POLL_NS = 500_000_000  # the wait also ends this often, so a context shut down under the thread is noticed


class TakenByReceiver(CallbackGroup):
    """The group of the subscriptions a :class:`FrameReceiver` takes, and of their QoS event handlers: an executor
    leaves out whatever ``can_execute`` refuses, so it neither takes their messages nor waits on their events (an
    event shares the reader's status condition with its data, so an executor that waited on the event alone would
    wake and spin for as long as a message stays untaken). The receiver handles both."""

    def can_execute(self, entity: Any) -> bool:
        return False

    def beginning_execution(self, entity: Any) -> bool:
        return False

    def ending_execution(self, entity: Any) -> None:
        pass


class FrameReceiver:
    """One thread that waits on ``subscriptions`` (created with raw=True in a :class:`TakenByReceiver` group) and
    passes each message's bytes to its handler, one message per ready subscription per wake, so a camera that
    floods the node does not keep the others waiting. ``on_error(index, reason)`` hears a failed take (the
    thread goes on) or, for every subscription, why the thread ended on its own (a subscription destroyed under
    it); a context shut down ends it quietly. Handlers must not raise (the node's catch whatever a hostile message
    could cause); one that raises anyway is reported through ``on_error`` and the thread goes on."""

    def __init__(self, context: Context, subscriptions: Sequence[Subscription],
                 handlers: Sequence[Callable[[bytes], None]], on_error: Callable[[int, str], None],
                 name: str = "frame_receiver") -> None:
        if len(subscriptions) != len(handlers):
            raise ValueError("one handler per subscription")
        for sub in subscriptions:
            if not sub.raw or not isinstance(sub.callback_group, TakenByReceiver):
                raise ValueError(f"{sub.topic_name}: a FrameReceiver needs a raw subscription in a "
                                 "TakenByReceiver callback group (else the executor takes its messages too)")
        self._context = context
        self._subs = list(subscriptions)
        self._handlers = list(handlers)
        self._on_error = on_error
        self._stop = False
        self._wake = GuardCondition(None, None, context=context)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread (it finishes the message in hand) and wait for it; the subscriptions stay alive."""
        self._stop = True
        try:
            self._wake.trigger()
        except Exception:  # noqa: BLE001 - the context is already shut down: the wait has ended with an error
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()  # within POLL_NS even if the trigger did not reach the wait
        self._wake.destroy()

    def _run(self) -> None:
        subs = self._subs
        # a list, which rclpy's annotation (EventHandler) misnames
        events = [(i, handler) for i, sub in enumerate(subs)
                  for handler in cast(list[EventHandler], sub.event_handlers)]
        context_handle = self._context.handle
        try:
            if context_handle is None:
                raise RuntimeError("the context has no handle")
            wait_set = _rclpy.WaitSet(len(subs), 1, 0, 0, 0, len(events), context_handle)
        except Exception as exc:  # noqa: BLE001 - the context shut down before the thread started, or rcl refused
            self._ended(f"the frame receiver could not start: {exc}")
            return
        while not self._stop and self._context.ok():
            try:
                # Every handle the wait uses is held for the wait (rclpy's executor does the same): a subscription
                # destroyed from another thread meanwhile then raises here, instead of freeing what rcl_wait reads.
                with ExitStack() as held:
                    held.enter_context(context_handle)
                    held.enter_context(self._wake.handle)
                    for sub in subs:
                        held.enter_context(sub.handle)
                    for _, handler in events:
                        held.enter_context(handler)
                    wait_set.clear_entities()
                    for sub in subs:
                        wait_set.add_subscription(sub.handle)
                    for _, handler in events:
                        handler.add_to_wait_set(wait_set)
                    wait_set.add_guard_condition(self._wake.handle)
                    wait_set.wait(POLL_NS)
                    ready = set(wait_set.get_ready_entities("subscription"))
                    taken = [(i, sub) for i, sub in enumerate(subs) if sub.handle.pointer in ready]
                    fired = [(i, handler) for i, handler in events if handler.is_ready(wait_set)]
            except Exception as exc:  # noqa: BLE001 - a destroyed subscription, the context shut down meanwhile
                self._ended(f"the frame receiver stopped: {exc}")
                return
            for i, handler in fired:
                self._event(i, handler)
            for i, sub in taken:
                if self._stop:
                    return
                self._take(i, sub)

    def _ended(self, reason: str) -> None:
        """The thread ends on its own: every camera hears why, unless it was stopped or the context shut down
        (then nobody waits for frames any more)."""
        if not self._stop and self._context.ok():
            for i in range(len(self._subs)):
                self._on_error(i, reason)

    def _event(self, index: int, handler: EventHandler) -> None:
        """A QoS event (incompatible QoS, ...): its callback, as the executor would have run it (rclpy's default
        ones log a warning)."""
        try:
            data = handler.take_data()
            if data:
                handler.callback(data)
        except Exception as exc:  # noqa: BLE001 - a user's or rclpy's event callback failed; the frames go on
            self._on_error(index, f"QoS event callback failed: {exc}")

    def _take(self, index: int, sub: Subscription) -> None:
        try:
            with sub.handle:
                taken = sub.handle.take_message(sub.msg_type, True)
        except Exception as exc:  # noqa: BLE001 - e.g. an rmw error; counted by the node, the thread goes on
            self._on_error(index, str(exc))
            time.sleep(ERROR_PAUSE_S)
            return
        if taken is None:  # the message was gone by the time we took it (another reader, a lost sample)
            return
        try:
            self._handlers[index](taken[0])
        except Exception as exc:  # noqa: BLE001 - a handler bug must not end every camera's frames unheard
            self._on_error(index, f"frame handler failed: {exc!r}")
