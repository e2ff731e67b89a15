"""Class tables: names, colours and the ignore id of a dataset, kept as data files.

The tables live in ``unet_perception/class_tables/<name>.json``; an exported ONNX model carries its
table in its metadata (``classes`` key), so the runtime never needs the dataset files.
"""

from __future__ import annotations

import json
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
    def from_dict(cls, data: dict[str, Any]) -> ClassTable:
        classes = sorted(data["classes"], key=lambda c: int(c["id"]))
        ids = [int(c["id"]) for c in classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"class table '{data.get('name')}': ids must be 0..N-1 without gaps, got {ids}")
        ignore = data.get("ignore_index")
        return cls(
            name=str(data.get("name", "unnamed")),
            names=tuple(str(c["name"]) for c in classes),
            colors=tuple(tuple(int(v) for v in c["color"]) for c in classes),  # type: ignore[misc]
            ignore_index=None if ignore is None else int(ignore),
            description=str(data.get("description", "")),
            layout=dict(data.get("layout", {})),
        )

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> ClassTable:
        """Rebuild the table from an exported model's metadata props."""
        if "classes" not in meta:
            raise ValueError("model metadata has no 'classes' entry; export it with unet-export")
        ignore = meta.get("ignore_index", "")
        return cls.from_dict({
            "name": meta.get("dataset", "model"),
            "classes": json.loads(meta["classes"]),
            "ignore_index": int(ignore) if ignore not in ("", "None", "null") else None,
        })


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
