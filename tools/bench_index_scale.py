"""The training loader's start-up at LAION-2B scale: an index of up to 230,000 shards, 1 or 1,000 streams.

    python tools/bench_index_scale.py                         # the table: 2,300 / 23,000 / 230,000 shards, 1 and 1,000 streams
    python tools/bench_index_scale.py --shards 230000 --ranks 2   # one case; ends with the summary line

A synthetic but valid layout: ``--real`` real MDS shards of ``--samples`` samples each (small noise
JPEGs with three captions, written once), and per stream an ``index.json`` whose entries are copies of
the real shards' entries (their sizes, columns and hashes) with the shard names reused in turn, the
shard files themselves hard links to the real ones. The loader therefore starts on exactly the
index a LAION-2B layout has (230,000 shards x 10,000 samples = 2.3 billion samples) and reads real
samples, without 230,000 shards' bytes.

Each rank is a process of its own (``RANK``/``LOCAL_RANK``... as torchrun sets them, one node, gloo
process group) that builds the training loader (``data.loader.build_train_dataloader``) and takes
one batch. Measured per rank: seconds from process start to the first batch, peak RSS (and the
RSS the loader added), the index files opened (each open is one parse, by us or by Streaming: an
audit hook counts them) and the bytes read from them; per node: the shared memory Streaming created.
Streaming draws each epoch's sample order over the epoch's samples: the runs use ``--epoch-size``
samples per epoch (``data.epoch_size``), as a LAION-2B recipe must (docs/data.md, "Large indexes").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from rwkvclip_dist.cli import run_tool

REPO = Path(__file__).resolve().parent.parent
START = time.monotonic()


def write_real_shards(out: Path, count: int, samples: int) -> list[dict]:
    """``count`` MDS shards of ``samples`` samples each; returns their index entries."""
    import io

    import numpy as np
    from PIL import Image
    from streaming import MDSWriter

    from rwkvclip_dist.data.columns import COMPRESSION, columns

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    entries = []
    for k in range(count):
        part = out / f"part_{k}"
        if not (part / "index.json").is_file():
            # One writer per shard, its size limit above the shard's size: exactly `samples` rows each.
            with MDSWriter(out=str(part), columns=columns(), compression=COMPRESSION, size_limit=(1 << 32) - 1,
                           max_workers=1) as writer:
                for i in range(samples):
                    writer.write({"key": f"r{k}_{i}", "jpg": jpg, "raw": f"a photo {i}", "synthetic": f"synthetic {i}",
                                  "generated": f"generated {i}", "tags": [], "width": 16, "height": 16,
                                  "source": "bench"})
        entry = json.loads((part / "index.json").read_text())["shards"][0]
        raw = part / entry["raw_data"]["basename"]
        if entry.get("zip_data") and not raw.exists():
            # The raw file beside the compressed one: the ranks then read the shards as they are. Left
            # to Streaming, two ranks decompress the same file (one name serves many index entries)
            # into the same temporary name, and one of them fails.
            from streaming.base.compression import decompress

            data = decompress(entry["compression"], (part / entry["zip_data"]["basename"]).read_bytes())
            raw.write_bytes(data)
        for key in ("raw_data", "zip_data"):
            if entry.get(key):
                name = entry[key]["basename"].replace("shard.00000", f"shard.{k:05d}")
                if not (out / name).exists() and (part / entry[key]["basename"]).exists():
                    os.link(part / entry[key]["basename"], out / name)
                entry[key]["basename"] = name
        entries.append(entry)
    return entries


def write_layout(root: Path, real: Path, entries: list[dict], shards: int, streams: int) -> list[Path]:
    """``streams`` stream directories holding ``shards`` index entries in all; returns them."""
    dirs = []
    per_stream = [shards // streams + (1 if s < shards % streams else 0) for s in range(streams)]
    for s, count in enumerate(per_stream):
        stream = root / f"stream_{s:04d}"
        stream.mkdir(parents=True, exist_ok=True)
        listed = []
        for i in range(count):
            entry = json.loads(json.dumps(entries[i % len(entries)], allow_nan=False))
            listed.append(entry)
        for entry in entries:
            for key in ("raw_data", "zip_data"):
                name = (entry.get(key) or {}).get("basename")
                if name and (real / name).is_file() and not (stream / name).exists():
                    os.link(real / name, stream / name)
        (stream / "index.json").write_text(json.dumps({"version": 2, "shards": listed}, allow_nan=False))
        dirs.append(stream)
    return dirs


def _rank_main(args: argparse.Namespace) -> None:
    """One rank: build the training loader, take a batch, print one JSON line of measurements."""
    opened = {"count": 0, "bytes": 0}

    def audit(event: str, details: tuple) -> None:
        if event == "open" and isinstance(details[0], (str, Path)) and str(details[0]).endswith("index.json"):
            opened["count"] += 1
            try:
                opened["bytes"] += os.path.getsize(details[0])
            except OSError:
                pass

    sys.addaudithook(audit)
    import torch.distributed as dist

    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader

    import streaming  # noqa: F401 - imports timed apart from the loader's own start-up

    imported = time.monotonic() - START
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_import = usage.ru_utime + usage.ru_stime
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    streams = [StreamConfig(remote=str(p)) for p in sorted(Path(args.layout).iterdir()) if p.is_dir()]
    rss_before = _rss_mib()
    cfg = DataConfig(streams=streams, batch_size=8, num_workers=0, epoch_size=args.epoch_size,
                     shuffle_block_size=1 << 16, num_canonical_nodes=1, sampling_granularity=args.granularity)
    loader, _ = build_train_dataloader(cfg, 16, seed=0)
    built = time.monotonic() - START
    batches = iter(loader)
    next(batches)
    first = time.monotonic() - START
    shm = sum(f.stat().st_size for f in Path("/dev/shm").iterdir() if f.is_file()) if int(os.environ["RANK"]) == 0 else 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rank": int(os.environ["RANK"]), "imports_s": imported, "built_s": built,
                      "cpu_s": usage.ru_utime + usage.ru_stime - cpu_at_import,
                      "first_batch_s": first, "loader_s": first - imported,
                      "peak_rss_mib": _rss_mib(), "loader_rss_mib": _rss_mib() - rss_before,
                      "index_opens": opened["count"], "index_bytes": opened["bytes"], "shm_bytes": shm},
                     allow_nan=False), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _rss_mib() -> float:
    """This process's peak RSS. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over fork and exec,
    so a rank would report the peak of the parent that wrote the layout."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_case(layout: Path, ranks: int, epoch_size: int, granularity: int, code: Path = REPO) -> list[dict]:
    """Start ``ranks`` rank processes on ``layout`` running the package under ``code``; their measurement lines."""
    import subprocess

    from rwkvclip_dist.data.shm import clean_stale_shm
    from rwkvclip_dist.parallel.launch_env import LaunchEnv, free_port, rank_variables

    clean_stale_shm()
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = {**os.environ, **rank_variables(LaunchEnv(rank, ranks, rank, ranks, "127.0.0.1", port, "torchrun")),
               "PYTHONPATH": str(code)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-of", str(layout),
                                       "--epoch-size", str(epoch_size), "--granularity", str(granularity)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows, failed = [], []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            failed.append(f"rank {rank} exited with {proc.returncode}:\n{err[-3000:]}")
        else:
            rows.append(json.loads(out.strip().splitlines()[-1]))
    if failed:
        raise SystemExit("bench_index_scale: " + "\n".join(failed))
    clean_stale_shm()
    return rows


def measure(work: Path, real_entries: list[dict], real: Path, shards: int, streams: int, ranks: int,
            epoch_size: int, granularity: int, code: Path = REPO) -> dict:
    layout = work / f"layout_{shards}_{streams}"
    if not layout.is_dir():
        write_layout(layout, real, real_entries, shards, streams)
    index_bytes = sum((d / "index.json").stat().st_size for d in layout.iterdir())
    rows = run_case(layout, ranks, epoch_size, granularity, code)
    samples = shards * real_entries[0]["samples"]
    return {"code": "this tree" if code == REPO else str(code), "shards": shards, "streams": streams, "ranks": ranks,
            "samples": samples, "index_mib": index_bytes / 2**20,
            "first_batch_s": max(r["first_batch_s"] for r in rows), "imports_s": max(r["imports_s"] for r in rows),
            "loader_s": max(r["loader_s"] for r in rows),
            "cpu_s": max(r["cpu_s"] for r in rows),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rows),
            "loader_rss_mib": max(r["loader_rss_mib"] for r in rows),
            "index_parses_per_node": sum(r["index_opens"] for r in rows) / streams,
            "index_read_mib_per_node": sum(r["index_bytes"] for r in rows) / 2**20,
            "shm_mib": max(r["shm_bytes"] for r in rows) / 2**20}


def _median(runs: list[dict]) -> dict:
    """Each measured column's median over ``runs`` (the spread: min-max of the first batch and loader RSS)."""
    import statistics

    out = {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v) for k, v in runs[0].items()}
    for key in ("first_batch_s", "loader_rss_mib"):
        out[key + "_range"] = (min(r[key] for r in runs), max(r[key] for r in runs))
    return {**out, "runs": len(runs)}


def _spread(row: dict, key: str, fmt: str) -> str:
    low, high = row[key + "_range"]
    return fmt.format(row[key]) + (f" ({fmt.format(low)}-{fmt.format(high)})" if row["runs"] > 1 else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_index_scale.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=None, help="one case with this many shards")
    parser.add_argument("--case", action="append", default=None, metavar="SHARDSxSTREAMS",
                        help="a case to run (repeatable), e.g. 2300x1; default: the five of the table")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--real", type=int, default=2, help="real shards whose entries the index reuses")
    parser.add_argument("--epoch-size", type=int, default=100_000)
    parser.add_argument("--granularity", type=int, default=10_000, help="data.sampling_granularity")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="also run every case on the rwkvclip_dist package under DIR (e.g. `git archive` of an "
                             "older commit), alternating with this tree's in the same run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case and code; the table gives medians")
    parser.add_argument("--work", default=None, help="where the layout goes (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "index_scale.md"),
                        help="where the table goes ('' for nowhere)")
    parser.add_argument("--rank-of", default=None, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.rank_of:
        args.layout = args.rank_of
        _rank_main(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        real = work / f"real_{args.real}x{args.samples}"
        entries = write_real_shards(real, args.real, args.samples)
        cases = ([(args.shards, args.streams)] if args.shards else
                 [tuple(int(x) for x in c.split("x")) for c in args.case] if args.case else
                 [(2_300, 1), (23_000, 1), (230_000, 1), (2_300, 1_000), (230_000, 1_000)])
        codes = [Path(args.baseline).resolve(), REPO] if args.baseline else [REPO]
        results = []
        for shards, streams in cases:
            runs: dict[Path, list[dict]] = {code: [] for code in codes}
            for _ in range(args.repeat):
                for code in codes:  # alternating: both see the same machine, run after run
                    runs[code].append(measure(work, entries, real, shards, streams, args.ranks, args.epoch_size,
                                              args.granularity, code))
            results += [_median(runs[code]) for code in codes]
    header = ("| code | runs | shards | streams | samples | index | ranks | first batch (from start) | imports | loader to first batch | "
              "loader CPU time / rank | peak RSS / rank | loader RSS / rank | "
              "index parses / node (per stream) | index read / node | Streaming shm / node |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in results:
        lines.append(f"| {r['code']} | {r['runs']} | {r['shards']:,} | {r['streams']:,} | {r['samples']:,} | {r['index_mib']:.1f} MiB | {r['ranks']} | "
                     f"{_spread(r, 'first_batch_s', '{:.1f}')} s | {r['imports_s']:.1f} s | {r['loader_s']:.1f} s | {r['cpu_s']:.1f} s | {r['peak_rss_mib']:.0f} MiB | "
                     f"{_spread(r, 'loader_rss_mib', '{:.0f}')} MiB | "
                     f"{r['index_parses_per_node']:.0f} | {r['index_read_mib_per_node']:.1f} MiB | {r['shm_mib']:.1f} MiB |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "# The training loader's start-up at LAION-2B index scale\n\n"
            f"`python tools/bench_index_scale.py {' '.join(sys.argv[1:])}` ({args.ranks} ranks on one node, {args.samples:,} samples per "
            f"shard, data.epoch_size={args.epoch_size:,}, data.sampling_granularity={args.granularity:,}); what each column measures: the tool's docstring.\n\n"
            + table + "\n")
    last = results[-1]  # this tree's
    print(f"first_batch_s={last['first_batch_s']:.1f} index_rss_mib={last['loader_rss_mib']:.0f} "
          f"index_parses_per_node={last['index_parses_per_node']:.0f}")
    return 0



def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
