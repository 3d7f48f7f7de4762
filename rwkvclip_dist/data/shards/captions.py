"""The ``--captions`` join, out of core: JSONL files merged into one sorted on-disk SQLite table.

Caption files for LAION-scale data hold hundreds of millions of keys, too many for a dict. They are
indexed once per build (``index_captions``): every line is appended to a staging table, SQLite sorts it
on disk (an index on ``(key, seq)``; its sorter spills to ``$SQLITE_TMPDIR`` past the page cache) and a
single ``GROUP BY`` writes the merged rows in key order, so memory stays bounded by the page cache
whatever the number of rows. Workers then look keys up in the read-only table (``CaptionTable``).

Merge rule, as with a dict: per field, the last line (in file order, files in ``--captions`` order)
that has the field wins. A field that a line gives as ``null`` counts as given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import urllib.parse
from typing import Iterable, Protocol

FIELDS = ("synthetic", "generated", "tags")
CACHE_KIB = 65536     # SQLite page cache per connection (and the sorter's memory before it spills)
_SEQ_DIGITS = 15      # zero-padded line number prefixed to each value so max() picks the latest


class CaptionLookup(Protocol):
    """What the builder needs from a caption store (``CaptionTable``; the benchmark's dict baseline)."""

    def get(self, key: str) -> dict | None: ...

    def __len__(self) -> int: ...

    def unknown(self, hit_files: list[str], scratch: str, sample: int = 20) -> tuple[int, list[str]]: ...


def index_path(out: str, paths: list[str]) -> str:
    """Where the index of these caption files lives under ``out`` (named by their paths, sizes, mtimes)."""
    ident = json.dumps([(os.path.abspath(p), os.path.getsize(p), os.path.getmtime(p)) for p in paths], allow_nan=False)
    return os.path.join(out, f"captions-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.sqlite")


def uri(path: str, read_only: bool = False) -> str:
    """SQLite URI of a file; read-only means immutable too: no locks, so many readers on a shared
    file system (Lustre, NFS) are fine."""
    return f"file:{urllib.parse.quote(os.path.abspath(path))}" + ("?mode=ro&immutable=1" if read_only else "")


def connect(path: str, read_only: bool = False) -> sqlite3.Connection:
    """A connection with a bounded page cache; writable ones skip the journal (files are scratch or
    renamed into place when complete)."""
    conn = sqlite3.connect(uri(path, read_only), uri=True)
    if not read_only:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    return conn


def _check_field_types(obj: dict, where: str) -> None:
    """A wrong type would otherwise surface deep in a worker as an AttributeError naming no file."""
    for name in FIELDS:
        value = obj.get(name)
        if value is None:  # absent, or null: given as empty
            continue
        ok = (isinstance(value, list) and all(isinstance(t, str) for t in value) if name == "tags"
              else isinstance(value, str))
        if not ok:
            want = "a list of strings" if name == "tags" else "a string"
            raise ValueError(f"{where}: key {obj['key']!r}: '{name}' must be {want}, got {value!r}")


def _lines(paths: list[str]) -> Iterable[tuple]:
    seq = 0
    for path in paths:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
                    raise ValueError(f"{path}:{n}: each line needs a string 'key'")
                _check_field_types(obj, f"{path}:{n}")
                seq += 1
                yield (seq, obj["key"], *(json.dumps(obj[k], allow_nan=False) if k in obj else None for k in FIELDS))


def index_captions(paths: list[str], db: str) -> str:
    """Build (once) the merged caption table ``db`` from JSONL ``paths``; returns ``db``.

    Written under a temporary name and renamed, so concurrent builders and an interrupted run never
    leave a half-written table behind (at worst two processes build the same table).
    """
    if os.path.exists(db):
        return db
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    tmp = f"{db}.tmp{os.getpid()}"
    staging = tmp + ".staging"
    for p in (tmp, staging):
        if os.path.exists(p):
            os.remove(p)
    try:
        conn = connect(tmp)
        conn.execute("ATTACH DATABASE ? AS s", (uri(staging),))
        conn.execute("PRAGMA s.journal_mode=OFF")
        conn.execute("CREATE TABLE s.lines (seq INTEGER, key TEXT, synthetic TEXT, generated TEXT, tags TEXT)")
        rows = _lines(paths)
        while True:
            batch = [r for _, r in zip(range(50_000), rows)]
            if not batch:
                break
            conn.executemany("INSERT INTO s.lines VALUES (?, ?, ?, ?, ?)", batch)
        # The on-disk sort. Covering (every column in the index), so the GROUP BY below reads the
        # sorted index front to back instead of jumping into the table for each row.
        conn.execute("CREATE INDEX s.by_key ON lines (key, seq, synthetic, generated, tags)")
        conn.execute("CREATE TABLE captions (key TEXT PRIMARY KEY, synthetic TEXT, generated TEXT, "
                     "tags TEXT) WITHOUT ROWID")
        latest = ", ".join(f"substr(max(CASE WHEN {f} IS NOT NULL THEN printf('%0{_SEQ_DIGITS}d', seq) "
                           f"|| {f} END), {_SEQ_DIGITS + 1})" for f in FIELDS)
        conn.execute(f"INSERT INTO captions SELECT key, {latest} FROM s.lines GROUP BY key ORDER BY key")
        conn.execute("CREATE TABLE meta (rows INTEGER)")
        conn.execute("INSERT INTO meta SELECT count(*) FROM captions")
        conn.commit()
        conn.execute("DETACH DATABASE s")
        conn.close()
        os.replace(tmp, db)
    finally:
        for p in (tmp, staging):
            if os.path.exists(p):
                os.remove(p)
    return db


class CaptionTable:
    """Read-only lookups in an ``index_captions`` table; safe to inherit across ``fork`` (each process
    opens its own connection on first use)."""

    def __init__(self, db: str | None) -> None:
        self.db = db
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._rows = 0
        if db is not None:
            self._rows = self._cursor().execute("SELECT rows FROM meta").fetchone()[0]

    def _cursor(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            self._conn, self._pid = connect(self.db, read_only=True), os.getpid()
        return self._conn

    def __len__(self) -> int:
        return self._rows

    def get(self, key: str) -> dict | None:
        """The merged fields of ``key`` (only those some line gave), or None for an unknown key."""
        if not self._rows:
            return None
        row = self._cursor().execute("SELECT synthetic, generated, tags FROM captions WHERE key = ?",
                                     (key,)).fetchone()
        if row is None:
            return None
        return {f: json.loads(v) for f, v in zip(FIELDS, row) if v is not None}

    def unknown(self, hit_files: list[str], scratch: str, sample: int = 20) -> tuple[int, list[str]]:
        """(number of caption keys that no input sample has, the first ``sample`` of them in key order).

        ``hit_files`` list, one JSON string a line, the input keys found in this table (a key may
        repeat across files); they are counted on disk, in the scratch database ``scratch``.
        """
        if not self._rows:
            return 0, []
        if os.path.exists(scratch):
            os.remove(scratch)
        conn = connect(scratch)
        try:
            conn.execute("ATTACH DATABASE ? AS c", (uri(self.db, read_only=True),))
            conn.execute("CREATE TABLE hits (key TEXT)")
            for path in hit_files:
                with open(path) as f:
                    conn.executemany("INSERT INTO hits VALUES (?)", ((json.loads(line),) for line in f))
            conn.execute("CREATE INDEX hits_key ON hits (key)")
            found = conn.execute("SELECT count(DISTINCT key) FROM hits").fetchone()[0]
            first = [k for (k,) in conn.execute(
                "SELECT key FROM c.captions WHERE NOT EXISTS (SELECT 1 FROM hits WHERE hits.key = "
                "c.captions.key) ORDER BY key LIMIT ?", (sample,))]
        finally:
            conn.close()
            os.remove(scratch)
        return self._rows - found, first
