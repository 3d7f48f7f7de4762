"""Keys written by more than one unit, found on disk (the key lists of a LAION build do not fit a set)."""

from __future__ import annotations

import json
import os

from rwkvclip_dist.data.shards.captions import connect


def later_duplicates(key_files: list[str], scratch: str) -> dict[int, set[str]]:
    """``{unit position: keys an earlier unit already wrote}`` for units whose written keys are listed
    (one JSON string a line) in ``key_files``, in input order; the first unit to write a key keeps it.

    SQLite sorts the keys on disk (an index on ``(key, unit)``) in the scratch database ``scratch``;
    only the duplicates, which are rare, come back into memory.
    """
    if os.path.exists(scratch):
        os.remove(scratch)
    conn = connect(scratch)
    try:
        conn.execute("CREATE TABLE keys (key TEXT, unit INTEGER)")
        for unit, path in enumerate(key_files):
            with open(path) as f:
                conn.executemany("INSERT INTO keys VALUES (?, ?)", ((json.loads(line), unit) for line in f))
        conn.execute("CREATE INDEX by_key ON keys (key, unit)")
        rows = conn.execute("SELECT key, unit FROM keys WHERE key IN (SELECT key FROM keys GROUP BY key "
                            "HAVING count(*) > 1) ORDER BY key, unit")
        out: dict[int, set[str]] = {}
        previous = None
        for key, unit in rows:
            if key == previous:
                out.setdefault(unit, set()).add(key)
            previous = key
    finally:
        conn.close()
        os.remove(scratch)
    return out
