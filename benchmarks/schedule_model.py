"""A discrete-event model of the node's keep-latest slots and workers: why the 4 x 30 Hz p99 has a floor.

    python benchmarks/schedule_model.py [--inference-ms 16] [--one-thread-ms 29] [--seconds 60]

Cameras publish at a fixed rate with given phases; each camera has one slot that keeps its newest frame; a free
worker takes a frame by the given order and is busy for one inference (drawn uniformly from 0.85 to 1.4 x the
given time: the spread of the node's own inference times on the shared VM). Latency = wait in the slot +
inference, as the node's diagnostics split it. Orders: ``newest-in-turn`` (the node's since 2026-12-03: cameras
take turns, within a turn the newest frame first, a camera that fell behind catches up by one turn at most),
``turns`` (round robin over the cameras with a frame: the node's before), ``oldest`` (the frame that waited
longest), ``least-served`` (the camera served longest ago) and ``freshest-gain`` (the newest frame relative to the
camera's last service). Not a measurement: a check that the
measured medians and p99 follow from the slots alone, and of what another order could change.
"""

from __future__ import annotations

import argparse
import heapq
import random

import numpy as np

ORDERS = ("newest-in-turn", "turns", "oldest", "least-served", "freshest-gain")
PHASES = {"staggered": (0.0, 0.25, 0.5, 0.75), "two pairs": (0.09, 0.12, 0.6, 0.63), "triggered": (0.0, 0.0, 0.0, 0.03)}


def simulate(order: str, workers: int, inference_s: float, phases: tuple[float, ...], rate_hz: float = 30.0,
             seconds: float = 60.0, seed: int = 0) -> tuple[list[float], float, float]:
    """(output fps per camera, latency p50 ms, p99 ms); phases are fractions of the camera period."""
    rng = random.Random(seed)
    n, period = len(phases), 1.0 / rate_hz
    slot: list[float | None] = [None] * n      # arrival time of the frame waiting in each camera's slot
    busy, served, turns = [False] * n, [0.0] * n, [0] * n
    latencies: list[list[float]] = [[] for _ in range(n)]
    events: list[tuple[float, int, int, float]] = [(p * period, 0, k, 0.0) for k, p in enumerate(phases)]
    heapq.heapify(events)                      # (time, 0 = arrival / 1 = inference done, camera, arrival)
    free, next_turn = workers, 0
    while events:
        now, kind, k, arrived = heapq.heappop(events)
        if now > seconds:
            break
        if kind == 0:
            slot[k] = now                      # keep-latest: a waiting frame is replaced (a drop)
            heapq.heappush(events, (now + period, 0, k, 0.0))
        else:
            busy[k], free = False, free + 1
            latencies[k].append(now - arrived)
        while free:
            ready = [c for c in range(n) if slot[c] is not None and not busy[c]]
            if not ready:
                break
            if order == "turns":
                c = next(c for c in ((next_turn + i) % n for i in range(n)) if c in ready)
                next_turn = (c + 1) % n
            elif order == "newest-in-turn":
                least = min(turns[c] for c in ready)
                c = max((c for c in ready if turns[c] == least), key=lambda c: slot[c] or 0.0)
            elif order == "oldest":
                c = min(ready, key=lambda c: slot[c] or 0.0)
            elif order == "least-served":
                c = min(ready, key=lambda c: served[c])
            else:
                c = max(ready, key=lambda c: (slot[c] or 0.0) - served[c])
            start, slot[c] = slot[c] or 0.0, None
            busy[c], served[c], free = True, now, free - 1
            turns[c] = max(turns[c] + 1, max(turns) - 1)
            heapq.heappush(events, (now + inference_s * rng.uniform(0.85, 1.4), 1, c, start))
    every = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return [len(x) / seconds for x in latencies], float(np.percentile(every, 50)), float(np.percentile(every, 99))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference-ms", type=float, default=16.0, help="one inference on every thread (workers 1)")
    p.add_argument("--one-thread-ms", type=float, default=29.0, help="one inference on one thread (workers 2)")
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    print("| camera phases | workers | order | fps per camera | p50 ms | p99 ms |\n|---|--:|---|---|--:|--:|")
    for name, phases in PHASES.items():
        for workers, ms in ((1, args.inference_ms), (2, args.one_thread_ms)):
            for order in ORDERS:
                fps, p50, p99 = simulate(order, workers, ms / 1e3, phases, seconds=args.seconds)
                print(f"| {name} | {workers} | {order} | {' / '.join(f'{f:.1f}' for f in fps)} | {p50:.0f} "
                      f"| {p99:.0f} |")


if __name__ == "__main__":
    main()
