"""Build MDS shards (column contract in ``columns.py``) from tars, tables or folders.

Each input unit is written by one worker into its own part directory ``OUT/<unit>/`` and marked done in
``OUT/.build/``; a re-run skips finished units and rewrites unfinished ones, so an interrupted build
resumes without duplicates. The parts are joined with Streaming's ``merge_index`` into ``OUT/index.json``.
Duplicate keys across units keep the first occurrence in input order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from rwkvclip_dist.data.columns import COMPRESSION, DEFAULT_SIZE_LIMIT, columns
from rwkvclip_dist.data.sources import Unit, discover_units, read_unit
from rwkvclip_dist.data.validate import REASONS, ImageOptions, Rejected, to_row

log = logging.getLogger(__name__)
STATE_DIR = ".build"
REPORT = "build_report.json"
REJECTS = "build_rejects.jsonl"


@dataclass
class BuildOptions:
    """Options of one ``make_shards`` run."""

    inputs: list[str]
    out: str
    captions: list[str] = field(default_factory=list)
    resize_max_side: int | None = None
    workers: int = 1
    size_limit: int = DEFAULT_SIZE_LIMIT
    jpeg_quality: int = 95

    def fingerprint(self) -> str:
        """Changes when a finished unit would come out differently (so it must be rebuilt)."""
        caps = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self.captions]
        key = json.dumps([self.resize_max_side, self.size_limit, self.jpeg_quality, caps])
        return hashlib.sha1(key.encode()).hexdigest()


def load_captions(paths: list[str]) -> dict[str, dict]:
    """Merge JSONL files of ``{"key", "synthetic"?, "generated"?, "tags"?}``; later files win per field."""
    merged: dict[str, dict] = {}
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
                fields = {k: v for k, v in obj.items() if k in ("synthetic", "generated", "tags")}
                for name, value in fields.items():
                    ok = (isinstance(value, list) and all(isinstance(t, str) for t in value) if name == "tags"
                          else isinstance(value, str))
                    if not ok:
                        want = "a list of strings" if name == "tags" else "a string"
                        raise ValueError(f"{path}:{n}: key {obj['key']!r}: '{name}' must be {want}, got {value!r}")
                merged.setdefault(obj["key"], {}).update(fields)
    return merged


# Worker globals, set by the pool initializer (the captions table can be large: inherit, don't pickle).
_CAPTIONS: dict[str, dict] = {}
_PROGRESS: "mp.Queue | _BarSink | None" = None


class _BarSink:
    """Stands in for the progress queue when units are built in this process."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _init_worker(captions: dict, progress: "mp.Queue | _BarSink | None") -> None:
    global _CAPTIONS, _PROGRESS
    _CAPTIONS, _PROGRESS = captions, progress


def _tick(n: int) -> None:
    if _PROGRESS is not None and n:
        _PROGRESS.put(n)


def build_unit(unit: Unit, out: str, opts: BuildOptions, exclude: frozenset[str] = frozenset()) -> dict:
    """Write one unit's part directory; returns its summary (also stored as the done marker)."""
    part = os.path.join(out, unit.name)
    state = os.path.join(out, STATE_DIR)
    shutil.rmtree(part, ignore_errors=True)
    img_opts = ImageOptions(opts.resize_max_side, opts.jpeg_quality)
    counts: Counter = Counter()
    seen: set[str] = set()
    written: list[str] = []
    pending = 0
    with MDSWriter(out=part, columns=columns(), compression=COMPRESSION, size_limit=opts.size_limit) as w, \
            open(os.path.join(state, unit.name + ".rejects.jsonl"), "w") as rej:
        samples = read_unit(unit)
        while True:
            try:
                s = next(samples, None)
            except (tarfile.TarError, OSError, EOFError) as e:
                # A truncated or damaged container: keep what was read, report the rest as lost.
                counts["unreadable_input"] += 1
                rej.write(json.dumps({"input": unit.path, "key": None, "reason": "unreadable_input",
                                      "detail": f"{type(e).__name__}: {e}"}) + "\n")
                break
            if s is None:
                break
            try:
                if s.key in seen or s.key in exclude:
                    raise Rejected("duplicate_key", "key already used by an earlier sample")
                seen.add(s.key)
                row = to_row(s, _CAPTIONS.get(s.key), img_opts)
                w.write(row)
                written.append(s.key)
            except Rejected as r:
                counts[r.reason] += 1
                rej.write(json.dumps({"input": s.source, "key": s.key, "reason": r.reason,
                                      "detail": r.detail}) + "\n")
            pending += 1
            if pending >= 256:
                _tick(pending)
                pending = 0
    _tick(pending)
    with open(os.path.join(state, unit.name + ".keys"), "w") as f:
        f.write("".join(json.dumps(k) + "\n" for k in written))
    summary = {"unit": asdict(unit), "written": len(written), "rejected": dict(counts),
               "fingerprint": opts.fingerprint(), "exclude": sorted(exclude)}
    tmp = os.path.join(state, unit.name + ".done.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f)
    os.replace(tmp, os.path.join(state, unit.name + ".done"))  # atomic: a unit is done or it is not
    return summary


def _done(out: str, unit: Unit, fingerprint: str) -> dict | None:
    path = os.path.join(out, STATE_DIR, unit.name + ".done")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("fingerprint") == fingerprint else None


def _run_units(units: list[Unit], opts: BuildOptions, captions: dict, excludes: dict) -> None:
    if not units:
        return
    ctx = mp.get_context("fork")
    progress = ctx.Queue()
    bar = tqdm(desc="samples", unit="sample", smoothing=0.1)
    if opts.workers <= 1:  # in-process: the debug path, and no pool start-up for one input
        _init_worker(captions, _BarSink(bar))
        for u in units:
            build_unit(u, opts.out, opts, excludes.get(u.name, frozenset()))
        bar.close()
        return
    with ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(captions, progress)) as pool:
        futures = [pool.submit(build_unit, u, opts.out, opts, excludes.get(u.name, frozenset()))
                   for u in units]
        while not all(f.done() for f in futures):
            try:
                bar.update(progress.get(timeout=0.2))
            except queue.Empty:
                pass
        for f in futures:
            f.result()  # re-raise a worker's error (e.g. an unreadable table) here
    while not progress.empty():
        bar.update(progress.get())
    bar.close()


def build_shards(opts: BuildOptions) -> dict:
    """Run (or resume) a build; returns the report also written to ``OUT/build_report.json``."""
    units = discover_units(opts.inputs)
    captions = load_captions(opts.captions)
    os.makedirs(os.path.join(opts.out, STATE_DIR), exist_ok=True)
    fp = opts.fingerprint()
    todo = [u for u in units if _done(opts.out, u, fp) is None]
    log.info("%d input unit(s), %d already built", len(units), len(units) - len(todo))
    _run_units(todo, opts, captions, {})

    # Cross-unit duplicates: the first unit in input order keeps the key; later units are rebuilt
    # without it (rare, so rewriting the unit is simpler than editing shards in place).
    claimed: set[str] = set()
    excludes: dict[str, frozenset[str]] = {}
    for u in units:
        with open(os.path.join(opts.out, STATE_DIR, u.name + ".keys")) as f:
            keys = [json.loads(line) for line in f]
        done = _done(opts.out, u, fp)
        clash = (set(keys) & claimed) | set(done["exclude"] if done else ())
        if clash - set(done["exclude"] if done else ()):
            excludes[u.name] = frozenset(clash)
        claimed.update(keys)
    _run_units([u for u in units if u.name in excludes], opts, captions, excludes)

    return _finish(opts, units, captions)


def _finish(opts: BuildOptions, units: list[Unit], captions: dict) -> dict:
    state = os.path.join(opts.out, STATE_DIR)
    counts: Counter = Counter()
    written = 0
    input_keys: set[str] = set()
    with open(os.path.join(opts.out, REJECTS), "w") as rej_out:
        for u in units:
            summary = _done(opts.out, u, opts.fingerprint())
            written += summary["written"]
            counts.update(summary["rejected"])
            with open(os.path.join(state, u.name + ".keys")) as f:
                input_keys.update(json.loads(line) for line in f)
            with open(os.path.join(state, u.name + ".rejects.jsonl")) as f:
                for line in f:
                    key = json.loads(line)["key"]
                    if key is not None:
                        input_keys.add(key)
                    rej_out.write(line)
    parts = [os.path.join(opts.out, u.name, "index.json") for u in units
             if _done(opts.out, u, opts.fingerprint())["written"] > 0]
    index = os.path.join(opts.out, "index.json")
    if os.path.exists(index):
        os.remove(index)  # merge_index refuses to overwrite the index of an earlier run
    if parts:
        merge_index(parts, opts.out)
    unknown = sorted(set(captions) - input_keys)
    report = {"written": written, "rejected": {r: counts.get(r, 0) for r in REASONS},
              "rejected_total": sum(counts.values()), "units": len(units),
              "unknown_caption_keys": len(unknown), "unknown_caption_keys_sample": unknown[:20],
              "rejects_file": REJECTS}
    with open(os.path.join(opts.out, REPORT), "w") as f:
        json.dump(report, f, indent=2)
    return report
