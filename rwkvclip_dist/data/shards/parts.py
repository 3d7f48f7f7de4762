"""Shard building across a cluster: N independent parts, then one merge.

``build_part(opts, I, N)`` builds the input units ``k`` with ``k % N == I`` (whole input files, in the
order ``discover_units`` gives, so every part agrees on the split without talking to the others) into
``OUT/part-I-of-N/``, resumably, and marks the part complete with ``part.json``. ``merge_parts(OUT)``
checks that all N parts are complete and built with the same inputs and options, drops keys that an
earlier part already wrote (first occurrence in input order wins, as in a one-part build), and joins
the part indexes with Streaming's ``merge_index`` into ``OUT/index.json``, with the report and rejects of
a one-part build. ``prepare(opts)`` checks the inputs and indexes the captions once, before the parts
start (``slurm/make_shards.sh``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, fields

from rwkvclip_dist.data.streaming_compat import merge_index

from rwkvclip_dist.data.shards.builder import (STATE_DIR, BuildOptions, Context, build_units, done_summary,
                                        drop_duplicates, finish, make_context, unit_indexes)
from rwkvclip_dist.data.shards.captions import CaptionTable
from rwkvclip_dist.data.shards.labels import Labeller
from rwkvclip_dist.data.shards.sources import Unit, discover_units

MANIFEST = "part.json"
_PART = re.compile(r"part-(\d+)-of-(\d+)")


class IncompleteBuild(RuntimeError):
    """Some parts are missing or unfinished; the message says which and how to rerun them."""


def part_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}"


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--shard {spec!r}: expected I/N with 0 <= I < N (e.g. 3/16)")
    return int(m.group(1)), int(m.group(2))


def prepare(opts: BuildOptions) -> int:
    """Check inputs and label options and index the captions; returns the number of input units."""
    units = discover_units(opts.inputs)
    make_context(opts, units, overwrite=opts.overwrite)
    return len(units)


def _write_part_index(ctx: Context, root: str, placed: list[tuple[Unit, str]]) -> None:
    index = os.path.join(root, "index.json")
    if os.path.exists(index):
        os.remove(index)
    indexes = unit_indexes(ctx, placed)
    if indexes:
        merge_index(indexes, root)  # the part reads on its own too


def _tally(ctx: Context, placed: list[tuple[Unit, str]]) -> tuple[int, dict[str, int]]:
    written, rejected = 0, {}
    for u, root in placed:
        summary = done_summary(root, u, ctx.fingerprint)
        written += summary["written"]
        for reason, n in summary["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    return written, rejected


def build_part(opts: BuildOptions, i: int, n: int) -> dict:
    """Build (or resume) part ``i`` of ``n``; returns its summary (also in ``part.json``)."""
    units = discover_units(opts.inputs)
    root = os.path.join(opts.out, part_name(i, n))
    os.makedirs(os.path.join(root, STATE_DIR), exist_ok=True)
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)  # complete again only once this run has finished
    ctx = make_context(opts, units)
    placed = [(u, root) for k, u in enumerate(units) if k % n == i]
    build_units(ctx, placed)
    _write_part_index(ctx, root, placed)
    written, rejected = _tally(ctx, placed)
    options = {f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in ("out", "workers", "overwrite")}
    summary = {"part": i, "parts": n, "written": written, "rejected": rejected,
               "fingerprint": ctx.fingerprint, "captions_db": ctx.captions.db, "options": options,
               "all_units": [u.name for u in units], "units": [asdict(u) for u, _ in placed]}
    with open(manifest + ".tmp", "w") as f:
        json.dump(summary, f, allow_nan=False)
    os.replace(manifest + ".tmp", manifest)
    return summary


def _manifests(out: str) -> tuple[int, dict[int, dict]]:
    found = sorted({(int(m.group(1)), int(m.group(2))) for d in os.listdir(out)
                    if (m := _PART.fullmatch(d)) and os.path.isdir(os.path.join(out, d))})
    if not found:
        raise ValueError(f"--merge: {out} has no part directories (part-I-of-N); build them with --shard I/N")
    splits = sorted({n for _, n in found})
    if len(splits) > 1:
        raise ValueError(f"--merge: {out} holds parts of different splits (of {splits}); remove the stale ones")
    n = splits[0]
    manifests = {}
    for i in range(n):
        path = os.path.join(out, part_name(i, n), MANIFEST)
        if os.path.exists(path):
            with open(path) as f:
                manifests[i] = json.load(f)
    missing = [i for i in range(n) if i not in manifests]
    if missing:
        ids = ",".join(map(str, missing))
        raise IncompleteBuild(f"--merge: part(s) {ids} of {n} under {out} are missing or unfinished; rerun "
                              f"them (--shard I/{n}; with Slurm: sbatch --array={ids} slurm/make_shards.sh "
                              f"part {n} ARGS) and merge again")
    return n, manifests


def merge_parts(out: str, workers: int = 1, expect: BuildOptions | None = None) -> dict:
    """Merge the N complete parts under ``out``; returns the one-part build's report.

    ``expect``: the build arguments as the caller has them (the Slurm script passes the parts'
    arguments again); they must match what the parts were built with.
    """
    n, manifests = _manifests(out)
    first = manifests[0]
    for i, m in manifests.items():
        for key in ("all_units", "fingerprint", "options"):
            if m[key] != first[key]:
                raise ValueError(f"--merge: {part_name(i, n)} was built with other {key.replace('_', ' ')} "
                                 f"than {part_name(0, n)}; rebuild it with the same arguments")
    if expect is not None:
        if [u.name for u in discover_units(expect.inputs)] != first["all_units"]:
            raise ValueError("--merge: --input names other files than the parts were built from")
        for key, value in first["options"].items():
            if key != "inputs" and getattr(expect, key) != value:
                raise ValueError(f"--merge: --{key.replace('_', '-')} {getattr(expect, key)!r} differs from "
                                 f"the parts' {value!r}")
    opts = BuildOptions(out=out, workers=workers, **first["options"])
    units = [Unit(u["kind"], u["path"], tuple(u["files"])) for m in manifests.values() for u in m["units"]]
    by_name = {u.name: u for u in units}
    placed = [(by_name[name], os.path.join(out, part_name(k % n, n))) for k, name in enumerate(first["all_units"])]
    ctx = Context(opts, first["fingerprint"], CaptionTable(first["captions_db"]),
                  Labeller(opts.label_options(), units) if opts.labels else None, opts.decontaminator())
    for u, root in placed:
        if done_summary(root, u, ctx.fingerprint) is None:
            raise IncompleteBuild(f"--merge: unit {u.name} of {os.path.basename(root)} is not built; rerun that part")
    drop_duplicates(ctx, placed)  # across parts; each part already dropped its own
    for i in range(n):
        root = os.path.join(out, part_name(i, n))
        _write_part_index(ctx, root, [(u, r) for u, r in placed if r == root])
    indexes = [os.path.join(out, part_name(i, n), "index.json") for i in range(n)]
    return finish(ctx, placed, [p for p in indexes if os.path.exists(p)])
