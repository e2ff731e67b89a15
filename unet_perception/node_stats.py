"""Per-camera counters of the segmentation node: frames, drops, errors, latencies, and the camera's own rate
from its header stamps (frames lost before the node show as longer gaps). Guarded by the node's lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

LATENCY_WINDOW = 200          # latency mean / p99 over the last this many frames of a camera
STAMP_WINDOW = 50             # the input rate is the median period of the last this many header-stamp gaps
MIN_GAPS = 5                  # gaps needed before frames missing are counted against that period
MAX_SKIP = 1000               # a stamp jump of more periods is a restart (bag loop, clock reset), not a loss
MAX_REORDER = 10              # a stamp more periods older than the newest is a restart too, not a late frame


@dataclass
class StampRate:
    """A camera's own rate, from its header stamps: frames lost before the node show as longer gaps."""

    last_ns: int = 0
    gaps: deque[int] = field(default_factory=lambda: deque(maxlen=STAMP_WINDOW))
    missing: int = 0  # frames the stamps say were sent but never arrived

    def add(self, stamp_ns: int) -> None:
        if stamp_ns <= 0:  # an unset stamp says nothing
            return
        period = self.period_ns() if len(self.gaps) >= MIN_GAPS else 0.0
        if stamp_ns <= self.last_ns:
            # Repeats and slightly out-of-order frames say nothing about loss. A jump back of many periods is a
            # restart (a bag looping, a clock reset, a frame stamped in the future before it): count from here,
            # or every frame until the old stamp came round again would be ignored.
            if not period or self.last_ns - stamp_ns > MAX_REORDER * period:
                self.last_ns = stamp_ns
            return
        if self.last_ns:
            gap = stamp_ns - self.last_ns
            skipped = round(gap / period) - 1 if period else 0
            if skipped > MAX_SKIP:  # a jump forward (a restart, a bogus stamp): neither a loss nor a period
                self.last_ns = stamp_ns
                return
            self.missing += max(skipped, 0)
            self.gaps.append(gap)
        self.last_ns = stamp_ns

    def period_ns(self) -> float:
        return float(np.median(self.gaps)) if self.gaps else 0.0

    def rate_hz(self) -> float:
        period = self.period_ns()
        return 1e9 / period if period and len(self.gaps) >= MIN_GAPS else 0.0


@dataclass
class CameraStats:
    """Counters of one camera; guarded by the node's lock."""

    frames_in: int = 0
    decoded: int = 0  # frames_in that passed decoding and validation
    frames_out: int = 0
    drops: int = 0
    errors: int = 0
    last_error: str = ""
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    stamps: StampRate = field(default_factory=StampRate)
    # the counters at the previous diagnostics message, for rates and "recent" levels
    prev: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)
