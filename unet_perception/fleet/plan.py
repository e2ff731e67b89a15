"""``unet-bag label-many`` without Ray: which bags, where their outputs go, and what a run reports.

An input is a bag folder, a single ``.db3``/``.mcap`` file, a glob, or a text file listing any of these (one a
line, ``#`` comments; relative lines are taken from the list's folder). Each bag ``NAME`` is labelled to
``DIR/NAME`` (a ``.db3``/``.mcap`` file's stem). A bag is worked on in the run's hidden folder in ``DIR``
(``staging``) and renamed to ``DIR/NAME`` only when complete and its counts check out, so an output that exists
is a finished one and a rerun skips it.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rosbags.rosbag2 import Reader

from unet_perception.backends.engine_cache import atomic_write
from unet_perception.fleet.staging import LOCK_NAME, RUN_PREFIX
from unet_perception.tools.bag import BagError, camera_connections, open_bag
from unet_perception.topics import output_topics

BAG_SUFFIXES = (".db3", ".mcap")
REPORT_NAME = "label-many.json"


@dataclass(frozen=True)
class BagJob:
    """One input bag, the output bag it becomes, and (during a run) its own folder in the run's work folder."""

    src: Path
    out: Path
    work: Path | None = None

    @property
    def name(self) -> str:
        return self.out.name


def one_line(text: str) -> str:
    """``text`` on one line (a YAML or storage error can span several): a report row and a log line each. Bytes
    of a file name that are not UTF-8 (surrogates in Python) are shown as ``\\udcXX``: printing them would fail."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # a control character (an ANSI escape in a file name) is shown, not sent to the terminal
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in " | ".join(lines))


def _utf8(path: Path, what: str) -> None:
    """A ``BagError`` unless ``path`` is UTF-8 text: Ray cannot start a driver whose arguments are not, and
    rosbags opens sqlite3 files by a text URI."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BagError(one_line(f"{what} {path} has a name that is not UTF-8 text; rename it")) from exc


def _from_list(path: Path) -> list[str]:
    """The paths a list file names: a line that is a path taken whole (``bags/a #2`` is that bag), else up to a
    ``#`` comment (was: always cut at ``#``, so ``bags/a #2`` labelled ``bags/a`` when it existed)."""
    text = path.read_bytes().decode("utf-8", "surrogateescape")  # a line that is not UTF-8 is refused as a path
    paths = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and os.path.lexists(path.parent / line):
            paths.append(str(path.parent / line))  # a bag whose name holds "#" (absolute lines join as themselves)
            continue
        line = line.split("#", 1)[0].strip()
        if line:
            paths.append(str(path.parent / line) if not os.path.isabs(line) else line)
    return paths


def expand_inputs(inputs: Sequence[str], out_dir: Path | None = None) -> list[Path]:
    """The bags named by ``inputs`` (folders, .db3/.mcap files, globs, list files), in order, each once.

    A path that exists is taken as it is, whatever characters its name has (``run[1]`` is a bag, not a pattern).
    What a glob matches in ``out_dir`` (or ``out_dir`` itself) is left out, so ``bags/*`` with
    ``--out bags/labelled`` works; a bag named outright that is ``out_dir`` or inside it, or an ``out_dir``
    inside an input bag, is refused (its outputs would be written among the inputs).
    """
    found: list[tuple[Path, bool]] = []  # (bag, named outright rather than matched by a glob)

    def add(item: str, listed_in: Path | None) -> None:
        path = Path(item)
        if path.is_dir() or (path.is_file() and path.suffix in BAG_SUFFIXES):
            found.append((path, True))
        elif path.is_file() and listed_in is None:
            for line in _from_list(path):
                add(line, path)
        elif glob.has_magic(item):
            matches = [Path(m) for m in sorted(glob.glob(item))]
            bags = [m for m in matches if m.is_dir() or m.suffix in BAG_SUFFIXES]
            if not bags:
                raise BagError(f"the pattern '{item}' matches no bag folder or .db3/.mcap file")
            found.extend((bag, False) for bag in bags)
        else:
            where = f" (listed in {listed_in})" if listed_in else ""
            kind = "a bag folder or .db3/.mcap file" if listed_in else \
                "bag folders, .db3/.mcap files, globs or a text file listing them"
            raise BagError(f"no bag at {item}{where}; give {kind}")

    for item in inputs:
        add(item, None)
    out = out_dir.resolve() if out_dir is not None else None
    seen: set[Path] = set()
    bags = []
    for path, named in found:
        real = path.resolve()
        if out is not None and real in out.parents:
            raise BagError(f"--out {out_dir} is inside the input bag {path}; give an --out outside the inputs")
        if out is not None and (real == out or out in real.parents):
            if named:
                where = "is" if real == out else "is inside"
                raise BagError(f"the input {path} {where} --out {out_dir}, where the labelled bags go; give an "
                               "--out that holds no input")
            continue  # a glob matched the output folder: earlier results, not an input
        if real not in seen:
            seen.add(real)
            bags.append(path)
    if not bags:
        raise BagError(f"no input bags in {list(inputs)}")
    return bags


def plan_jobs(bags: Sequence[Path], out_dir: Path) -> list[BagJob]:
    """One job per bag, its output ``out_dir/NAME``; refused before any work: two inputs with one NAME, and a
    NAME that is one of the run's own files in ``out_dir`` (the report, ``staging``'s lock and work folders)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BagError(f"--out {out_dir} is a file; give a folder for the labelled bags")
    _utf8(out_dir.absolute(), "--out")
    jobs = []
    for src in bags:
        src = Path(os.path.abspath(src))  # "..", "." and "bags/" spelled out, so NAME is the folder's own name
        _utf8(src, "the input")
        name = src.stem if src.is_file() else src.name
        if not name or name in (REPORT_NAME, LOCK_NAME) or name.startswith(RUN_PREFIX):
            raise BagError(f"the input {src} would be written to {out_dir / name}, which is the run's own "
                           f"{'report' if name == REPORT_NAME else 'file'}; rename the bag (or link it under "
                           "another name) and give that")
        jobs.append(BagJob(src, out_dir.absolute() / name))
    by_name: dict[str, list[str]] = {}
    for job in jobs:
        by_name.setdefault(job.name, []).append(str(job.src))
    clashes = {name: srcs for name, srcs in by_name.items() if len(srcs) > 1}
    if clashes:
        name, srcs = next(iter(clashes.items()))
        raise BagError(f"{len(srcs)} inputs would be written to {out_dir / name}: {', '.join(srcs)}; "
                       "label bags with the same name into different --out folders")
    return jobs


def camera_counts(src: Path, topics: Sequence[str] | None, exclude: Sequence[str] = ()) -> Counter[str]:
    """Camera topic -> messages its metadata lists, for the topics ``label`` labels."""
    counts: Counter[str] = Counter()
    with open_bag(src, info=lambda line: None) as reader:  # label_bag tells what it repairs; not twice
        for c in camera_connections(reader, topics):
            if c.topic not in exclude:
                counts[c.topic] += c.msgcount
    return counts


def check_counts(out: Path, listed: Counter[str], labelled: int, refused: int) -> int:
    """Frames in, from the labelled bag ``out`` itself; a ``BagError`` unless they add up.

    ``out`` holds every input message as read, so its camera messages are the frames in. They must equal its
    ``labels`` messages (``labelled``) plus the frames refused as bad input, and no fewer than the input's
    metadata listed (``listed``).
    """
    with Reader(out) as reader:
        have: Counter[str] = Counter()
        for c in reader.connections:
            have[c.topic] += c.msgcount
    frames = sum(have[t] for t in listed)
    labels = sum(have[output_topics(t)["labels"]] for t in listed)
    if frames < sum(listed.values()):
        raise BagError(f"frames lost: the input lists {sum(listed.values())} camera messages, "
                       f"{frames} were read")
    if labels != labelled or frames != labelled + refused:
        raise BagError(f"frame counts do not add up: {frames} frames in, {labels} label images written, "
                       f"{labelled} labelled + {refused} refused")
    return frames


@dataclass
class BagResult:
    """What happened to one bag. ``status``: labelled, skipped (its output existed) or failed."""

    name: str
    src: str
    out: str
    status: str
    frames_in: int = 0
    labelled: int = 0
    refused: int = 0                                         # camera messages refused as bad input
    seconds: float = 0.0
    attempts: int = 0                                        # > 1: a worker died on it and Ray retried it
    error: str = ""
    refusals: list[str] = field(default_factory=list)        # one line per refused message
    notices: list[str] = field(default_factory=list)         # what label_bag repaired (-wal, stale metadata)

    @property
    def fps(self) -> float:
        return self.labelled / self.seconds if self.seconds > 0 else 0.0

    @property
    def counts_ok(self) -> bool:
        return self.frames_in == self.labelled + self.refused


@dataclass
class FleetReport:
    """A run of ``label-many``: one result per input bag, in input order."""

    results: list[BagResult]
    seconds: float
    workers: list[str]                                       # one line per worker: backend, device, host

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def labelled_frames(self) -> int:
        return sum(r.labelled for r in self.results if r.status == "labelled")

    def table(self) -> str:
        head = f"{'bag':28s} {'status':9s} {'in':>6s} {'labelled':>8s} {'refused':>7s} {'s':>7s} {'fps':>7s} " \
               f"{'tries':>5s}  error"
        rows = [head]
        for r in self.results:
            rows.append(f"{one_line(r.name)[:28]:28s} {r.status:9s} {r.frames_in:6d} {r.labelled:8d} {r.refused:7d} "
                        f"{r.seconds:7.1f} {r.fps:7.1f} {r.attempts:5d}  {r.error}")
        done = [r for r in self.results if r.status == "labelled"]
        fps = self.labelled_frames / self.seconds if self.seconds > 0 else 0.0
        rows.append(f"{len(self.results)} bags: {len(done)} labelled, {self.count('skipped')} skipped (output "
                    f"existed), {self.count('failed')} failed; {self.labelled_frames} frames labelled in "
                    f"{self.seconds:.1f} s ({fps:.1f} frames/s) on {len(self.workers)} workers")
        if done:
            rows.append(f"counts checked: frames in = labelled + refused for all {len(done)} labelled bags "
                        f"({sum(r.frames_in for r in done)} = {self.labelled_frames} + "
                        f"{sum(r.refused for r in done)})")
        return "\n".join(rows)

    def write_json(self, path: Path) -> None:
        """The report as JSON at ``path``, written whole or not at all."""
        data = {"seconds": self.seconds, "workers": self.workers,
                "bags": {s: self.count(s) for s in ("labelled", "skipped", "failed")},
                "frames_labelled": self.labelled_frames,
                "results": [{**asdict(r), "fps": r.fps, "counts_ok": r.counts_ok} for r in self.results]}
        atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
