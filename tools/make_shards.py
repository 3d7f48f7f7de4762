#!/usr/bin/env python
"""Build MDS shards for rwkvclip_dist from webdataset tars, parquet/CSV tables or image folders.

    python tools/make_shards.py --input 'laion/{00000..00099}.tar' --out shards/laion \\
        --captions ofa.jsonl --captions llm.jsonl --resize-max-side 512 --workers 8

Across a cluster: part I of N on each node, then one merge (slurm/make_shards.sh does this as a
Slurm array and a dependent job):

    python tools/make_shards.py --prepare ARGS            # once: check inputs, index the captions
    python tools/make_shards.py ARGS --shard I/N          # for I in 0..N-1, anywhere, in any order
    python tools/make_shards.py --merge --out OUT         # after all parts

Labelled evaluation sets: ``--labels folder`` (ImageNet-style class subfolders) or ``--labels COLUMN``
(CSV/parquet column), optionally with ``--classes FILE`` (one class a line, in label order).

Decontamination: ``--decontam-eval-dir EVAL`` (the evaluation sets in the layout of
``tools/evaluate.py --suite``) hashes every evaluation image into an on-disk index (once, under
``--decontam-index``, default OUT/.build/decontam-index) and rejects every training sample whose image
is a near-duplicate of one (and, with ``--decontam-ngram N``, whose text shares a word N-gram with an
evaluation caption), as ``eval_contamination`` with the task and item it matches.

Bad samples are skipped and counted per reason (OUT/build_report.json, OUT/build_rejects.jsonl).
Exit status: 0 when samples were written (or a part/prepare step finished), 1 when nothing usable was
written or parts are missing at merge, 2 for bad arguments. Re-running the same command resumes an
interrupted build or part; another build into a folder that holds one is refused unless --overwrite.
Column contract and details: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from rwkvclip_dist.cli import at_least, run_tool
from rwkvclip_dist.data.shards.builder import REPORT, BuildOptions, build_shards
from rwkvclip_dist.data.shards.parts import IncompleteBuild, build_part, merge_parts, parse_shard, prepare
from rwkvclip_dist.outputs import check_folder_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", default=[],
                   help="tar / parquet / csv file, glob, or image folder (repeatable)")
    p.add_argument("--out", required=True, help="output directory (MDS index.json + part folders)")
    p.add_argument("--captions", action="append", default=[],
                   help="JSONL of {key, synthetic?, generated?, tags?}; repeatable, later files win")
    p.add_argument("--resize-max-side", type=at_least(1), default=None, help="downscale longer image side to N px")
    p.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1, help="parallel input files")
    p.add_argument("--size-limit", type=at_least(1), default=None, help="bytes per shard before compression")
    p.add_argument("--labels", default=None,
                   help="write a label column: 'folder' (class subfolders) or a CSV/parquet column name")
    p.add_argument("--classes", default=None, help="class list for --labels, one name a line in label order")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another build found in --out (by default it is refused; the same build resumes)")
    p.add_argument("--decontam-eval-dir", default=None,
                   help="evaluation sets (wds_<task> folders) whose images are kept out of the shards")
    p.add_argument("--decontam-suite", default="datacomp", help="which suite's task folders to read (datacomp, paper)")
    p.add_argument("--decontam-index", default=None, help="the on-disk hash index (built from --decontam-eval-dir "
                   "when absent; default OUT/.build/decontam-index)")
    p.add_argument("--decontam-max-distance", type=int, default=6, help="perceptual-hash bits within which "
                   "an image matches (0..7; default 6)")
    p.add_argument("--decontam-ngram", type=int, default=0, help="also reject texts sharing a word N-gram "
                   "with an evaluation caption (0: off); used when the index is built")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--shard", default=None, metavar="I/N", help="build only part I of N into OUT/part-I-of-N")
    mode.add_argument("--merge", action="store_true", help="merge the N parts under OUT into one index")
    mode.add_argument("--prepare", action="store_true",
                      help="check inputs and index the captions, for the parts to share")
    return p


def _decontam_index(args: argparse.Namespace) -> str | None:
    """The index to check samples against, built from ``--decontam-eval-dir`` when not there yet."""
    if args.decontam_eval_dir is None:
        if args.decontam_index is not None and not os.path.isdir(args.decontam_index):
            raise FileNotFoundError(f"--decontam-index {args.decontam_index}: no such index "
                                    f"(give --decontam-eval-dir to build it)")
        return args.decontam_index
    from rwkvclip_dist.eval.decontam_index import build_suite_index
    from rwkvclip_dist.eval.suite import get_suite

    index = args.decontam_index or os.path.join(args.out, ".build", "decontam-index")
    if os.path.isdir(index):
        return index
    summary = build_suite_index(get_suite(args.decontam_suite), args.decontam_eval_dir, index,
                                args.decontam_ngram, args.workers)
    print(json.dumps({"decontam_index": index, **{k: summary[k] for k in ("images", "undecodable_images", "captions")},
                      "tasks": len(summary["tasks"]), "tasks_missing": len(summary["missing"])}, allow_nan=False))
    return index


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not args.input and not args.merge:
        raise ValueError("--input is required (except with --merge)")
    if args.classes is not None and args.labels is None:
        raise ValueError("--classes needs --labels")
    for path, flag in [(c, "--captions") for c in args.captions] + [(args.classes, "--classes")]:
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path!r}: no such file")
    check_folder_path(args.out, "--out")  # before the decontamination index is built under it
    index = _decontam_index(args) if not args.merge else args.decontam_index
    opts = BuildOptions(inputs=args.input, out=args.out, captions=args.captions,
                        resize_max_side=args.resize_max_side, workers=args.workers,
                        labels=args.labels, classes=args.classes, overwrite=args.overwrite, decontam_index=index,
                        decontam_max_distance=args.decontam_max_distance)
    if args.size_limit is not None:
        opts.size_limit = args.size_limit
    try:
        if args.prepare:
            print(json.dumps({"units": prepare(opts)}, allow_nan=False))
            return 0
        if args.shard is not None:
            summary = build_part(opts, *parse_shard(args.shard))
            print(json.dumps({k: summary[k] for k in ("part", "parts", "written", "rejected")}, allow_nan=False))
            return 0
        report = merge_parts(args.out, args.workers, opts if args.input else None) if args.merge else build_shards(opts)
    except IncompleteBuild as e:
        print(f"make_shards.py: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: report[k] for k in ("written", "rejected_total", "rejected",
                                             "unknown_caption_keys")}, allow_nan=False))
    if report["written"] == 0:
        print(f"make_shards.py: error: no usable sample was written; see {os.path.join(args.out, REPORT)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
