"""Per-camera counters of the segmentation node: frames, drops, errors, latencies, and the camera's own rate
from its header stamps (frames lost before the node show as longer gaps). Guarded by the node's lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LATENCY_WINDOW = 200          # latency mean / p99 over the last this many frames of a camera
STAMP_WINDOW = 50             # the input rate is the median period of the last this many header-stamp gaps
MIN_GAPS = 5                  # gaps needed before frames missing are counted against that period
JUMP_PERIODS = 10             # a stamp further than this many periods from the newest is a jump, not a loss
MAX_JUMPS = 3                 # jump sizes kept for the next status; more are only counted (one per hostile frame)
NS = 1_000_000_000


def check_stamp(stamp: Any) -> None:
    """Refuse a header stamp that is not a time (ValueError: the node counts the frame as bad input)."""
    if not 0 <= stamp.nanosec < NS or stamp.sec < 0:
        raise ValueError(f"header.stamp sec={stamp.sec} nanosec={stamp.nanosec} is not a valid time "
                         "(sec >= 0, nanosec < 1e9)")


def stamp_ns(stamp: Any) -> int:
    """A header stamp in ns; 0 (says nothing, like an unset stamp) for one that check_stamp refuses."""
    return stamp.sec * NS + stamp.nanosec if 0 <= stamp.nanosec < NS and stamp.sec >= 0 else 0


@dataclass
class StampRate:
    """A camera's own rate, from its header stamps: frames lost before the node show as longer gaps.

    A stamp more than JUMP_PERIODS periods ahead of or behind the newest (a bag looping, a clock reset, one
    frame with a bogus stamp) is a jump: kept in ``jumps`` for diagnostics to report once, and counting goes
    on from it; it is neither a loss nor a period. When the stamps come back to within JUMP_PERIODS of where
    they jumped from, the jump was one stray frame and counting goes on from before it.
    """

    last_ns: int = 0
    gaps: deque[int] = field(default_factory=lambda: deque(maxlen=STAMP_WINDOW))
    missing: int = 0  # frames the stamps say were sent but never arrived
    jumps: list[int] = field(default_factory=list)  # sizes (ns, signed) not reported yet, at most MAX_JUMPS
    jumps_more: int = 0  # jumps not reported yet beyond those (a sender stamping at random jumps every frame)
    jumped_from: int = 0  # the newest stamp before the last jump forward, while no normal gap followed it

    def add(self, stamp_ns: int) -> None:
        if stamp_ns <= 0:  # an unset (or invalid) stamp says nothing
            return
        period = self.period_ns() if len(self.gaps) >= MIN_GAPS else 0.0
        if self.jumped_from and period and abs(stamp_ns - self.jumped_from) <= JUMP_PERIODS * period:
            self.last_ns, self.jumped_from = self.jumped_from, 0  # back on the old timeline: one stray frame
        if stamp_ns <= self.last_ns:
            # Repeats and slightly out-of-order frames say nothing about loss. A jump back of many periods is a
            # restart: count from here, or every frame until the old stamp came round again would be ignored.
            if not period or self.last_ns - stamp_ns > JUMP_PERIODS * period:
                self._jump(stamp_ns, period)
            return
        if self.last_ns:
            gap = stamp_ns - self.last_ns
            if period and gap > JUMP_PERIODS * period:
                self.jumped_from = self.last_ns
                self._jump(stamp_ns, period)
                return
            self.missing += max(round(gap / period) - 1, 0) if period else 0
            self.gaps.append(gap)
            self.jumped_from = 0
        self.last_ns = stamp_ns

    def _jump(self, stamp_ns: int, period: float) -> None:
        if period and len(self.jumps) < MAX_JUMPS:  # before a period is known, the first stamps only learn it
            self.jumps.append(stamp_ns - self.last_ns)
        elif period:
            self.jumps_more += 1
        self.last_ns = stamp_ns

    def take_jumps(self) -> tuple[list[int], int]:
        """The sizes of the first MAX_JUMPS jumps since the last call and how many more there were (diagnostics
        reports each once; bounded, however often the stamps jump between two statuses)."""
        jumps, more, self.jumps, self.jumps_more = self.jumps, self.jumps_more, [], 0
        return jumps, more

    def period_ns(self) -> float:
        return float(np.median(self.gaps)) if self.gaps else 0.0

    def rate_hz(self) -> float:
        period = self.period_ns()
        return 1e9 / period if period and len(self.gaps) >= MIN_GAPS else 0.0


@dataclass
class CameraStats:
    """Counters of one camera; guarded by the node's lock."""

    frames_in: int = 0
    failed: int = 0   # good frames (decoded) whose preparing, inference or publishing failed (each also an error)
    frames_out: int = 0
    drops: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # receipt to publish
    waits: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))      # receipt to taken
    inference: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))  # its batch's run
    # the same three summed over every frame published, s: exact means over any interval (two messages' totals)
    latency_total: float = 0.0
    wait_total: float = 0.0
    inference_total: float = 0.0
    stamps: StampRate = field(default_factory=StampRate)
    # the counters at the previous diagnostics message, for rates and "recent" levels
    prev: tuple[int, ...] = (0, 0, 0, 0, 0, 0)
