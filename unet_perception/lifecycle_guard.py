"""``change_state`` that answers every request: a transition the current state does not have is success=False.

Lifecycle managers send transition ids. Jazzy's rclpy hands an id to rcl without checking it against the
current state, and rcl's "Transition is not registered" error then escapes the service callback and
``rclpy.spin`` (ros2/rclpy#1209; fixed upstream by #1319, not in the Jazzy wheel): a manager sending
configure (1) or activate (3) to an autostarted, active node ended the process and every camera with it.
By label the same request was already answered success=False; this makes ids behave the same way.
"""

from __future__ import annotations

from typing import Any

from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.lifecycle import LifecycleNode

REFUSED_LOG_THROTTLE_S = 5.0  # at most one line this often for refused requests (each is still answered)


class GuardedLifecycleNode(LifecycleNode):
    """A LifecycleNode whose ``change_state`` service checks the request against the current state first, whose
    lifecycle services hold the state machine while they answer, and whose ``destroy_node`` takes the node out of
    the graph at once."""

    def destroy_node(self) -> None:
        """``Node.destroy_node``, then the lifecycle state machine. Jazzy's rclpy leaves the state machine to
        garbage collection, and it holds the rcl node: a destroyed node kept its name and its lifecycle services in
        the graph for as long as anything referred to the Python object (a traceback, a cycle)."""
        super().destroy_node()
        self._state_machine.destroy_when_not_in_use()

    # rclpy registers the service with ``self.__on_change_state``, i.e. this name-mangled attribute, so defining
    # it here is what the service calls (test_lifecycle_ids fails if a new rclpy stops doing so).
    def _LifecycleNodeMixin__on_change_state(self, req: Any, resp: Any) -> Any:
        try:
            with self._state_machine:  # in use while answering: a destroy meanwhile frees it only once this is done
                return self._answer_change_state(req, resp)
        except _rclpy.InvalidHandle:  # destroyed before the request was served
            resp.success = False
            return resp

    # The four read-only services read the state machine as well; rclpy's own handlers do it unguarded, and a
    # request served while another thread destroys the node then read a freed state machine (a segfault, every
    # camera gone). Each holds it while it answers; once it is destroyed the answer stays empty.
    def _LifecycleNodeMixin__on_get_state(self, req: Any, resp: Any) -> Any:
        return self._guarded("get_state", req, resp)

    def _LifecycleNodeMixin__on_get_available_states(self, req: Any, resp: Any) -> Any:
        return self._guarded("get_available_states", req, resp)

    def _LifecycleNodeMixin__on_get_available_transitions(self, req: Any, resp: Any) -> Any:
        return self._guarded("get_available_transitions", req, resp)

    def _LifecycleNodeMixin__on_get_transition_graph(self, req: Any, resp: Any) -> Any:
        return self._guarded("get_transition_graph", req, resp)

    def _guarded(self, service: str, req: Any, resp: Any) -> Any:
        try:
            with self._state_machine:
                return getattr(super(), f"_LifecycleNodeMixin__on_{service}")(req, resp)
        except _rclpy.InvalidHandle:
            return resp

    def _answer_change_state(self, req: Any, resp: Any) -> Any:
        state_id, state = self._state_machine.current_state
        available = {t[0]: t[1] for t in self._state_machine.available_transitions}  # id -> label
        label, tid = req.transition.label, req.transition.id
        asked = ascii(label[:40]) if label else str(tid)  # any client may call: escaped and short in the log
        if (label not in available.values()) if label else (tid not in available):
            choices = ", ".join(f"{name} ({i})" for i, name in available.items()) or "none"
            self.get_logger().warning(  # throttled: any client may send thousands
                f"change_state: transition {asked} is not available from state "
                f"'{state}'; available: {choices}", throttle_duration_sec=REFUSED_LOG_THROTTLE_S)
            resp.success = False
            return resp
        try:
            return super()._LifecycleNodeMixin__on_change_state(req, resp)  # type: ignore[misc]
        except _rclpy.RCLError as exc:  # belt and braces: whatever rcl refuses is an answer, not the node's end
            self.get_logger().error(f"change_state: transition {asked} from state "
                                    f"'{state}' ({state_id}) failed: {str(exc).split(', at ')[0]}",
                                    throttle_duration_sec=REFUSED_LOG_THROTTLE_S)
            resp.success = False
            return resp
