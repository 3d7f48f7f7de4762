"""Build MDS shards (column contract in ``columns.py``) from tars, tables or folders.

Each input unit is written by one worker into its own unit directory ``DIR/<unit>/`` and marked done in
``DIR/.build/``; a re-run skips finished units and rewrites unfinished ones, so an interrupted build
resumes without duplicates. ``DIR`` is ``OUT`` for a one-part build and ``OUT/part-I-of-N`` for a part
of a cluster build (``parts.py``). The unit indexes are joined with Streaming's ``merge_index``.
Duplicate keys across units keep the first occurrence in input order. Memory does not grow with the
data: captions are looked up in an on-disk table (``captions.py``) and duplicates are found on disk
(``dedup.py``).
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

from rwkvclip_dist.data.streaming_compat import MDSWriter, merge_index
from tqdm import tqdm

from rwkvclip_dist.data.shards.captions import CaptionLookup, CaptionTable, index_captions, index_path
from rwkvclip_dist.data.columns import COMPRESSION, DEFAULT_SIZE_LIMIT, columns
from rwkvclip_dist.data.shards.decontam import Decontaminator
from rwkvclip_dist.data.shards.dedup import later_duplicates
from rwkvclip_dist.data.shards.build_record import REJECTS, REPORT, STATE_DIR, claim_output
from rwkvclip_dist.data.shards.labels import Labeller, LabelOptions
from rwkvclip_dist.data.shards.sources import Unit, discover_units, read_unit
from rwkvclip_dist.data.shards.validate import REASONS, ImageOptions, Rejected, to_row

log = logging.getLogger(__name__)


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
    labels: str | None = None     # "folder" or a table column: write a ``label`` column (labels.py)
    classes: str | None = None    # class-list file for ``labels``
    overwrite: bool = False       # replace another build in ``out`` (build_record.py)
    decontam_index: str | None = None  # evaluation-image index (decontam.py): matching samples are rejected
    decontam_max_distance: int = 6     # perceptual-hash bits within which an image matches

    def fingerprint(self) -> str:
        """Changes when a finished unit would come out differently (so it must be rebuilt)."""
        caps = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in self.captions]
        labels = self.label_options().fingerprint() if self.labels else None
        decontam = [self.decontaminator().fingerprint()] if self.decontam_index else []
        key = json.dumps([self.resize_max_side, self.size_limit, self.jpeg_quality, caps, labels, *decontam],
                         allow_nan=False)
        return hashlib.sha1(key.encode()).hexdigest()

    def label_options(self) -> LabelOptions | None:
        return LabelOptions(self.labels, self.classes) if self.labels else None

    def decontaminator(self) -> Decontaminator | None:
        return Decontaminator(self.decontam_index, self.decontam_max_distance) if self.decontam_index else None


@dataclass
class Context:
    """What every unit of a build shares: inherited by the workers through ``fork``, never pickled."""

    opts: BuildOptions
    fingerprint: str
    captions: CaptionLookup
    labeller: Labeller | None = None
    decontam: Decontaminator | None = None


def open_captions(opts: BuildOptions) -> CaptionTable:
    """The build's caption table, indexed from ``opts.captions`` under ``OUT/.build`` on first use."""
    if not opts.captions:
        return CaptionTable(None)
    db = index_path(os.path.join(opts.out, STATE_DIR), opts.captions)
    if not os.path.exists(db):
        log.info("indexing %d caption file(s) into %s", len(opts.captions), db)
    return CaptionTable(index_captions(opts.captions, db))


def make_context(opts: BuildOptions, units: list[Unit], captions: CaptionLookup | None = None,
                 overwrite: bool = False) -> Context:
    """Checks the label options, then claims ``opts.out`` for this build (build_record.py), before
    anything is written there."""
    labeller = Labeller(opts.label_options(), units) if opts.labels else None  # checked before building
    claim_output(opts, units, overwrite)
    return Context(opts, opts.fingerprint(), open_captions(opts) if captions is None else captions, labeller,
                   opts.decontaminator())


_CTX: Context | None = None
_PROGRESS: "mp.Queue | _BarSink | None" = None


class _BarSink:
    """Stands in for the progress queue when units are built in this process."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def put(self, n: int) -> None:
        self.bar.update(n)


def _init_worker(ctx: Context, progress: "mp.Queue | _BarSink | None") -> None:
    global _CTX, _PROGRESS
    _CTX, _PROGRESS = ctx, progress


def _tick(n: int) -> None:
    if _PROGRESS is not None and n:
        _PROGRESS.put(n)


def _state(root: str, unit: Unit, suffix: str) -> str:
    return os.path.join(root, STATE_DIR, unit.name + suffix)


def build_unit(unit: Unit, root: str, exclude: frozenset[str] = frozenset()) -> dict:
    """Write one unit's directory under ``root``; returns its summary (also stored as the done marker).

    Beside the shards it leaves, in ``root/.build``: the written keys (``.keys``), the input keys found
    in the caption table (``.hits``, for the unknown-key count) and the rejects.
    """
    ctx = _CTX
    part = os.path.join(root, unit.name)
    shutil.rmtree(part, ignore_errors=True)
    img_opts = ImageOptions(ctx.opts.resize_max_side, ctx.opts.jpeg_quality)
    label_column = None if ctx.labeller is None or ctx.opts.labels == "folder" else ctx.opts.labels
    counts: Counter = Counter()
    seen: set[str] = set()
    written = pending = 0
    with MDSWriter(out=part, columns=columns(ctx.labeller is not None), compression=COMPRESSION,
                   size_limit=ctx.opts.size_limit) as w, \
            open(_state(root, unit, ".rejects.jsonl"), "w") as rej, \
            open(_state(root, unit, ".keys"), "w") as keys_out, open(_state(root, unit, ".hits"), "w") as hits_out:
        samples = read_unit(unit, label_column)
        while True:
            try:
                s = next(samples, None)
            except (tarfile.TarError, OSError, EOFError) as e:
                # A truncated or damaged container: keep what was read, report the rest as lost.
                counts["unreadable_input"] += 1
                rej.write(json.dumps({"input": unit.path, "key": None, "reason": "unreadable_input",
                                      "detail": f"{type(e).__name__}: {e}"}, allow_nan=False) + "\n")
                break
            if s is None:
                break
            caption = ctx.captions.get(s.key)
            if caption is not None:
                hits_out.write(json.dumps(s.key, allow_nan=False) + "\n")
            label = ctx.labeller.label(unit, s) if ctx.labeller is not None else None
            try:
                if s.key in seen or s.key in exclude:
                    raise Rejected("duplicate_key", "key already used by an earlier sample")
                seen.add(s.key)
                row = to_row(s, caption, img_opts, label)
                if ctx.decontam is not None:
                    ctx.decontam.check_row(row)
                w.write(row)
                keys_out.write(json.dumps(s.key, allow_nan=False) + "\n")
                written += 1
            except Rejected as r:
                counts[r.reason] += 1
                rej.write(json.dumps({"input": s.source, "key": s.key, "reason": r.reason,
                                      "detail": r.detail, **getattr(r, "match", {})}, allow_nan=False) + "\n")
            pending += 1
            if pending >= 256:
                _tick(pending)
                pending = 0
    _tick(pending)
    summary = {"unit": asdict(unit), "written": written, "rejected": dict(counts),
               "fingerprint": ctx.fingerprint, "exclude": sorted(exclude)}
    tmp = _state(root, unit, ".done.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, allow_nan=False)
    os.replace(tmp, _state(root, unit, ".done"))  # atomic: a unit is done or it is not
    return summary


def done_summary(root: str, unit: Unit, fingerprint: str) -> dict | None:
    """The unit's summary when it is built under ``root`` with these options, else None."""
    path = _state(root, unit, ".done")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("fingerprint") == fingerprint else None


def _run_units(ctx: Context, jobs: list[tuple[Unit, str, frozenset[str]]]) -> None:
    """Build ``(unit, root, exclude)`` jobs, in this process or in ``ctx.opts.workers`` forked workers."""
    if not jobs:
        return
    mp_ctx = mp.get_context("fork")
    progress = mp_ctx.Queue()
    bar = tqdm(desc="samples", unit="sample", smoothing=0.1)
    if ctx.opts.workers <= 1:  # in-process: the debug path, and no pool start-up for one input
        _init_worker(ctx, _BarSink(bar))
        for job in jobs:
            build_unit(*job)
        bar.close()
        return
    with ProcessPoolExecutor(ctx.opts.workers, mp_context=mp_ctx, initializer=_init_worker,
                             initargs=(ctx, progress)) as pool:
        futures = [pool.submit(build_unit, *job) for job in jobs]
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


def build_units(ctx: Context, placed: list[tuple[Unit, str]]) -> None:
    """Build the unfinished ones of ``(unit, root)`` (in input order), then drop cross-unit duplicates."""
    todo = [(u, root, frozenset()) for u, root in placed if done_summary(root, u, ctx.fingerprint) is None]
    log.info("%d input unit(s), %d already built", len(placed), len(placed) - len(todo))
    _run_units(ctx, todo)
    drop_duplicates(ctx, placed)


def drop_duplicates(ctx: Context, placed: list[tuple[Unit, str]]) -> None:
    """The first unit in input order keeps a key; later units are rebuilt without it (rare, so
    rewriting the unit is simpler than editing shards in place)."""
    dups = later_duplicates([_state(root, u, ".keys") for u, root in placed],
                            os.path.join(ctx.opts.out, STATE_DIR, f"scratch-dedup-{os.getpid()}.sqlite"))
    jobs = []
    for pos, keys in sorted(dups.items()):
        unit, root = placed[pos]
        before = set(done_summary(root, unit, ctx.fingerprint)["exclude"])
        if keys - before:
            jobs.append((unit, root, frozenset(keys | before)))
    if jobs:
        log.info("rebuilding %d unit(s) without keys that earlier units hold", len(jobs))
    _run_units(ctx, jobs)


def finish(ctx: Context, placed: list[tuple[Unit, str]], indexes: list[str]) -> dict:
    """Join ``indexes`` into ``OUT/index.json`` and write the report and rejects of all ``placed`` units."""
    out = ctx.opts.out
    counts: Counter = Counter()
    written = 0
    with open(os.path.join(out, REJECTS), "w") as rej_out:
        for u, root in placed:
            summary = done_summary(root, u, ctx.fingerprint)
            written += summary["written"]
            counts.update(summary["rejected"])
            with open(_state(root, u, ".rejects.jsonl")) as f:
                shutil.copyfileobj(f, rej_out)
    index = os.path.join(out, "index.json")
    if os.path.exists(index):
        os.remove(index)  # merge_index refuses to overwrite the index of an earlier run
    if indexes:
        merge_index(indexes, out)
    unknown, sample = ctx.captions.unknown([_state(root, u, ".hits") for u, root in placed],
                                           os.path.join(out, STATE_DIR, f"scratch-hits-{os.getpid()}.sqlite"))
    report = {"written": written, "rejected": {r: counts.get(r, 0) for r in REASONS},
              "rejected_total": sum(counts.values()), "units": len(placed),
              "unknown_caption_keys": unknown, "unknown_caption_keys_sample": sample,
              "rejects_file": REJECTS}
    with open(os.path.join(out, REPORT), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    return report


def unit_indexes(ctx: Context, placed: list[tuple[Unit, str]]) -> list[str]:
    """The index files of the units that wrote samples (an empty unit has no shard to list)."""
    return [os.path.join(root, u.name, "index.json") for u, root in placed
            if done_summary(root, u, ctx.fingerprint)["written"] > 0]


def build_shards(opts: BuildOptions, captions: CaptionLookup | None = None) -> dict:
    """Run (or resume) a one-part build; returns the report also written to ``OUT/build_report.json``.

    ``captions`` replaces the on-disk caption table (the benchmark's in-memory baseline).
    """
    units = discover_units(opts.inputs)
    ctx = make_context(opts, units, captions, opts.overwrite)
    placed = [(u, opts.out) for u in units]
    build_units(ctx, placed)
    return finish(ctx, placed, unit_indexes(ctx, placed))
