"""Class tables: names, colours and the ignore id of a dataset, kept as data files.

The tables live in ``unet_perception/class_tables/<name>.json``; an exported ONNX model carries its
table in its metadata (``classes`` key), so the runtime never needs the dataset files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

METADATA_FORMAT = "unet_perception/1"


@dataclass(frozen=True)
class ClassTable:
    """Class names and RGB colours of one label set; id ``i`` is ``names[i]``."""

    name: str
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int | None = None
    description: str = ""
    layout: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.colors):
            raise ValueError(
                f"class table '{self.name}': {len(self.names)} names but {len(self.colors)} colours")
        if not self.names:
            raise ValueError(f"class table '{self.name}' has no classes")
        if len(self.names) > 255:
            raise ValueError(f"class table '{self.name}': {len(self.names)} classes do not fit mono8 labels")
        for c in self.colors:
            if len(c) != 3 or any(not 0 <= v <= 255 for v in c):
                raise ValueError(f"class table '{self.name}': colour {c} is not an RGB triple in 0..255")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def palette(self) -> np.ndarray:
        """A 256x3 uint8 lookup table: class id -> RGB; ids without a class map to black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.colors, dtype=np.uint8)
        return lut

    def with_colors(self, colors: dict[str, tuple[int, int, int]]) -> ClassTable:
        """Copy with some colours replaced, keyed by class name (config overrides colours only)."""
        unknown = sorted(set(colors) - set(self.names))
        if unknown:
            raise ValueError(f"colour override names unknown classes {unknown}; known: {list(self.names)}")
        new = tuple(tuple(int(v) for v in colors.get(n, c)) for n, c in zip(self.names, self.colors))
        return ClassTable(self.name, self.names, new, self.ignore_index,  # type: ignore[arg-type]
                          self.description, self.layout)

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self) -> str:
        """The ``classes`` metadata value: a JSON list of {id, name, color}."""
        return json.dumps([{"id": i, "name": n, "color": list(c)}
                           for i, (n, c) in enumerate(zip(self.names, self.colors))])

    @classmethod
    def from_dict(cls, data: Any) -> ClassTable:
        """A table from its JSON form; TableError naming the field for anything that does not fit it."""
        if not isinstance(data, dict):
            raise TableError("table", f"must be a JSON object, got {shown(data)}")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes:
            raise TableError("classes", f"must be a non-empty JSON list of {{id, name, color}} objects, got "
                                        f"{shown(classes)}")
        if len(classes) > 255:
            raise TableError("classes", f"has {len(classes)} entries; mono8 labels hold at most 255 classes")
        rows = [_class_entry(c, i) for i, c in enumerate(classes)]
        rows.sort(key=lambda row: row[0])
        ids = [row[0] for row in rows]
        if ids != list(range(len(ids))):
            raise TableError("classes", f"ids must be 0..N-1 without gaps or repeats, got {ids}")
        ignore = data.get("ignore_index")
        layout = data.get("layout", {})
        if not isinstance(layout, dict):
            raise TableError("layout", f"must be a JSON object, got {shown(layout)}")
        return cls(
            name=check_text(data.get("name", "unnamed"), "name"),
            names=tuple(row[1] for row in rows),
            colors=tuple(row[2] for row in rows),
            ignore_index=None if ignore is None else check_int(ignore, "ignore_index", 0, 255),
            description=check_text(data.get("description", ""), "description", allow_empty=True),
            layout=dict(layout),
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ClassTable:
        """Rebuild the table from an exported model's metadata props."""
        if "classes" not in meta:
            raise TableError("classes", "is missing; export the model with unet-export")
        ignore = meta.get("ignore_index", "")
        return cls.from_dict({
            "name": check_text(meta.get("dataset") or "model", "dataset"),
            "classes": parse_json(meta["classes"], "classes"),
            "ignore_index": None if ignore in ("", "None", "null") else metadata_int(ignore, "ignore_index", 0, 255),
        })


class TableError(ValueError):
    """A class table (or model metadata) field that does not fit; ``field`` names it, e.g. ``classes[3].color``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"'{field}' {problem}")
        self.field, self.problem = field, problem


MAX_TEXT = 256  # class names and table names end up in logs, LabelInfo and rviz: short, printable text
MAX_JSON = 1 << 20


def shown(value: Any, limit: int = 60) -> str:
    """A value as a JSON type and a short, escaped excerpt: safe in a log line whatever it holds."""
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)
    text = ascii(value)
    return f"{kind} {text[:limit]}{'...' if len(text) > limit else ''}"


def check_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    """Printable text: no NUL, control characters (ANSI escapes), lone surrogates; at most MAX_TEXT chars."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise TableError(field, f"must be a non-empty string, got {shown(value)}")
    if len(value) > MAX_TEXT:
        raise TableError(field, f"has {len(value)} characters; at most {MAX_TEXT}")
    bad = next((i for i, ch in enumerate(value) if not ch.isprintable()), None)
    if bad is not None:
        raise TableError(field, f"holds the unprintable character U+{ord(value[bad]):04X} at position {bad} "
                                f"({shown(value)}); it must be printable text")
    return value


def check_int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TableError(field, f"must be an integer {lo}..{hi}, got {shown(value)}")
    return value


def metadata_int(text: Any, field: str, lo: int, hi: int) -> int:
    """An integer written as a metadata string ("11"), in lo..hi; TableError naming the field otherwise."""
    if isinstance(text, str) and re.fullmatch(r"-?[0-9]{1,18}", text.strip()):
        return check_int(int(text), field, lo, hi)
    raise TableError(field, f"must be an integer {lo}..{hi}, got {shown(text)}")


def parse_json(text: Any, field: str) -> Any:
    """A metadata value that holds JSON; TableError for anything that is not (deep nesting included)."""
    if not isinstance(text, str) or len(text) > MAX_JSON:
        raise TableError(field, f"must be JSON text of at most {MAX_JSON} characters")
    try:
        return json.loads(text)
    except RecursionError:
        raise TableError(field, "is JSON nested too deeply") from None
    except ValueError as exc:
        raise TableError(field, f"is not valid JSON ({exc})") from None


def _class_entry(entry: Any, index: int) -> tuple[int, str, tuple[int, int, int]]:
    where = f"classes[{index}]"
    if not isinstance(entry, dict):
        raise TableError(where, f"must be an object {{id, name, color}}, got {shown(entry)}")
    color = entry.get("color")
    if not isinstance(color, list | tuple) or len(color) != 3:
        raise TableError(f"{where}.color", f"must be a list of 3 integers 0..255, got {shown(color)}")
    rgb = tuple(check_int(v, f"{where}.color[{k}]", 0, 255) for k, v in enumerate(color))
    return (check_int(entry.get("id"), f"{where}.id", 0, 254), check_text(entry.get("name"), f"{where}.name"),
            rgb)  # type: ignore[return-value]


def available_tables() -> list[str]:
    """Names of the class tables shipped with the package."""
    folder = resources.files("unet_perception") / "class_tables"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_class_table(name_or_path: str | Path) -> ClassTable:
    """Load a shipped table by name (``camvid``, ``carla``) or any table JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("unet_perception") / "class_tables" / f"{name_or_path}.json"
        if not res.is_file():
            raise ValueError(f"unknown dataset '{name_or_path}'; shipped: {available_tables()}, "
                             "or give the path of a class-table JSON file")
        text = res.read_text()
    return ClassTable.from_dict(json.loads(text))
