"""A rosbag2 as its storage files hold it: connections, counts and messages from the .db3/.mcap files themselves.

rosbags' folder reader yields a stored message only when the storage's connection equals one of metadata.yaml's
in topic, type spelling, QoS string and type hash. Any difference drops those messages without a word: a recorder
that spells ``sensor_msgs/Image`` in its MCAP channels and ``sensor_msgs/msg/Image`` in metadata.yaml, or
metadata.yaml and the .db3 writing the QoS differently (rosbag2's own ``talker`` test bags read 0 of 20 messages).
So ``StoredBag`` matches nothing against metadata.yaml: its connections are the storage's own, one per topic and
type (the type in its full spelling), counted by the storage (sqlite3: its messages table; MCAP: the statistics of
its summary section, else its chunk indexes, else a scan), and metadata.yaml's counts are only compared with them
(``bag_preflight.compare_counts``) before any work. rosbags still parses metadata.yaml, decompresses
file-compressed bags and parses the storage files; message-compressed (zstd) payloads are decompressed here.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from rosbags.interfaces import Connection, MessageDefinitionFormat
from rosbags.rosbag2 import Reader
from rosbags.rosbag2.reader import DirectoryReader

from unet_perception.tools.bag_preflight import full_type

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

STORAGE_NAMES = {plugin: name for name, plugin in DirectoryReader.STORAGE_PLUGINS.items()}


class StoredBag:
    """An open bag (``Reader`` already opened) seen through its storage files; closing stays the caller's job.

    ``connections``: one per (topic, full type) the storage holds, ``msgcount`` the stored count, definition and
    hash from whichever file (or metadata.yaml) has them; a topic metadata.yaml lists with no message and the
    storage lacks is kept with 0, so a copy keeps every topic. ``listed``: metadata.yaml's counts per topic (None
    for a lone .db3/.mcap file, which has none).
    """

    def __init__(self, reader: Reader, path: Path) -> None:
        self.path = path  # as the user named it (``reader`` may read a repaired copy)
        self._storages = list(getattr(reader.storage, "storages", [reader.storage]))
        self._zstd_messages = reader.compression_mode == "message"
        self.storage_name = STORAGE_NAMES[type(self._storages[0])] if self._storages else "sqlite3"
        listed = list(reader.connections) if isinstance(reader.storage, DirectoryReader) else []
        self.listed: Counter[str] | None = None
        if isinstance(reader.storage, DirectoryReader):
            self.listed = Counter()
            for c in listed:
                self.listed[c.topic] += c.msgcount
        groups: dict[tuple[str, str], list[tuple[int, Connection]]] = {}
        for i, storage in enumerate(self._storages):
            for c in storage.connections:
                groups.setdefault((c.topic, full_type(c.msgtype)), []).append((i, c))
        stored_topics = {topic for topic, _ in groups}
        for c in listed:  # an empty topic that only metadata.yaml names
            if c.msgcount == 0 and c.topic not in stored_topics:
                groups.setdefault((c.topic, full_type(c.msgtype)), [])
        self.connections: list[Connection] = []
        self._ids: dict[tuple[int, int], Connection] = {}  # (storage index, storage connection id) -> ours
        for (topic, msgtype), stored in groups.items():
            same = [c for _, c in stored] + [c for c in listed if (c.topic, full_type(c.msgtype)) == (topic, msgtype)]
            msgdef = next((c.msgdef for c in same if c.msgdef.format != MessageDefinitionFormat.NONE), same[0].msgdef)
            ours = Connection(id=len(self.connections) + 1, topic=topic, msgtype=msgtype, msgdef=msgdef,
                              digest=next((c.digest for c in same if c.digest), ""),
                              msgcount=sum(c.msgcount for _, c in stored), ext=same[0].ext, owner=self)
            self.connections.append(ours)
            self._ids.update({(i, c.id): ours for i, c in stored})

    @property
    def message_count(self) -> int:
        return sum(c.msgcount for c in self.connections)

    def stored(self) -> Counter[str]:
        """Messages per topic as the storage holds them."""
        counts: Counter[str] = Counter()
        for c in self.connections:
            counts[c.topic] += c.msgcount
        return counts

    def messages(self, connections: Sequence[Connection] = ()) -> Iterator[tuple[Connection, int, bytes]]:
        """(connection, bag timestamp, serialized message) of ``connections`` (all when empty), file by file in
        time order, as rosbags reads a split bag."""
        wanted = {c.id for c in connections} if connections else {c.id for c in self.connections}
        for i, storage in enumerate(self._storages):
            mine = [c for c in storage.connections if (i, c.id) in self._ids and self._ids[(i, c.id)].id in wanted]
            if not mine:
                continue
            for conn, timestamp, data in storage.messages(mine):
                raw = zstd.decompress(data) if self._zstd_messages else data
                yield self._ids[(i, conn.id)], timestamp, raw

