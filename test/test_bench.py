"""`make bench` end to end, short and with the tiny model: the rows, the closed loop, the JSON and the goal lines.

Nothing here is a speed goal (those are printed by the benchmark itself); this checks that the benchmark measures
what it says: every frame sent is either labelled or counted as a drop, and the closed loop never floods the node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_bench_rows_and_json(tiny_model: Path, tmp_path: Path) -> None:
    figures = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--duration", "2", "--rates", "20,max",
           "--cameras", "1,4", "--model", str(tiny_model), "--images", str(tmp_path / "none"), "--json", str(figures)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["frames"].endswith("synthetic") and report["raw_fps"] > 0 and report["raw_core_ms"] > 0
    assert set(report["message_costs"]) >= {"in rgb8 rclpy deserialise", "in rgb8 raw_cdr.parse_image"}
    rows = {(r["cameras"], r["rate"]): r for r in report["rows"]}
    assert set(rows) == {(1, "20"), (1, "max"), (4, "20"), (4, "max")}
    for (cameras, _rate), row in rows.items():
        assert len(row["fps"]) == cameras and all(f > 0 for f in row["fps"]), row
        labelled = round(sum(row["fps"]) * 2)  # fps x the row's seconds, about
        assert row["drops"] <= row["sent"] and labelled <= row["sent"] + cameras, row
        assert row["p50_ms"] <= row["p99_ms"] and row["peak_rss_mib"] > 0 and row["cpu_pct"] > 0
        assert 0 < row["p50_ms"] and row["p99_ms"] < 10_000, row  # every frame stamped when sent, not before
        # the node's own means over this row's frames (its diagnostics' totals): each frame's latency holds its
        # wait and its inference (totals rounded to 0.1 ms each)
        assert row["node_ms"] + 0.5 >= row["node_wait_ms"] + row["node_inference_ms"] > 0, row
    # two frames in flight: the closed loop does not flood the node (a flood drops nearly every frame, as the 20 Hz
    # rows of a slow model do); the tiny model answers within milliseconds, so a few frames still meet a full slot
    assert rows[(1, "max")]["drops"] < rows[(1, "max")]["sent"] / 2
    assert [g.split()[0] for g in report["goals"]] and all(g[:4] in ("PASS", "MISS", "INFO") for g in report["goals"])
    assert "| cameras | rate Hz |" in out.stdout


def test_goals_are_judged_against_a_fair_raw_figure() -> None:
    """Latency is judged at 20 Hz, as the goal is written; on a machine where raw inference is slower than 25 fps
    (20 Hz then floods the node) an INFO line, never a PASS, adds the fastest rate of the run within 0.8 x raw
    fps. A row that timed raw inference just before it is judged against that figure."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [bench.Row(1, "10", p50_ms=70.0), bench.Row(1, "20", p50_ms=30.0), bench.Row(1, "max", p50_ms=20.0)]
    fast = [g for g in bench.goals(rows, raw_fps=40.0, raw_ms=25.0) if "latency" in g]
    assert fast == ["PASS  1 camera at 20 Hz: latency p50 30 ms <= raw 25 + 6 ms"]
    rows[1].p50_ms = 110.0
    slow = [g for g in bench.goals(rows, raw_fps=14.8, raw_ms=67.0) if "latency" in g]
    assert slow[0] == "MISS  1 camera at 20 Hz: latency p50 110 ms <= raw 67 + 6 ms" and len(slow) == 2
    assert slow[1].startswith("INFO  1 camera at 10 Hz: latency p50 70 ms against raw 67 + 6 ms (20 Hz")
    assert not [g for g in bench.goals(rows[2:], raw_fps=14.8, raw_ms=67.0) if "latency" in g]
    # a row with its own raw figure (timed just before it) is judged against that one
    row = bench.Row(4, "30", fps=[3.0, 3.0, 3.0, 3.0], p99_ms=140.0, raw_ms=50.0)
    four = bench.goals([row], raw_fps=14.8, raw_ms=67.0)
    assert four == ["MISS  4 cameras at 30 Hz: every camera 3.0 fps or more >= 0.85 x raw / 4 = 4.2",
                    "PASS  4 cameras at 30 Hz: p99 140 ms <= 3 x raw 50 ms"]


def test_the_node_means_of_a_row_come_from_the_difference_of_its_totals() -> None:
    """Two cameras, the diagnostics before and after a row: (sum of total differences) / (sum of frames_out
    differences), not the node's last-200-frame means (a short row would take in the row before)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    before = [{"frames_out": "100", "latency_total_ms": "2000.0", "latency_mean_ms": "20.00"},
              {"frames_out": "50", "latency_total_ms": "1500.0", "latency_mean_ms": "30.00"}]
    after = [{"frames_out": "110", "latency_total_ms": "2500.0", "latency_mean_ms": "22.73"},
             {"frames_out": "60", "latency_total_ms": "1800.0", "latency_mean_ms": "27.50"}]
    assert bench.node_mean_ms(before, after, "latency") == (500.0 + 300.0) / (10 + 10)
    assert bench.node_mean_ms(before, after, "wait") != bench.node_mean_ms(before, after, "wait")  # no totals: nan
    same = [dict(d) for d in before]
    assert bench.node_mean_ms(before, same, "latency") != bench.node_mean_ms(before, same, "latency")  # no frames
