#!/usr/bin/env python
"""Build MDS shards for rwkvclip_dist from webdataset tars, parquet/CSV tables or image folders.

    python tools/make_shards.py --input 'laion/{00000..00099}.tar' --out shards/laion \
        --captions ofa.jsonl --captions llm.jsonl --resize-max-side 512 --workers 8

Bad samples are skipped and counted per reason (OUT/build_report.json, OUT/build_rejects.jsonl).
Exit status: 0 when samples were written, 1 when nothing usable was written, 2 for bad arguments.
Re-running the same command resumes an interrupted build. Column contract: docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


from rwkvclip_dist.data.builder import REPORT, BuildOptions, build_shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", action="append", required=True,
                   help="tar / parquet / csv file, glob, or image folder (repeatable)")
    p.add_argument("--out", required=True, help="output directory (MDS index.json + part folders)")
    p.add_argument("--captions", action="append", default=[],
                   help="JSONL of {key, synthetic?, generated?, tags?}; repeatable, later files win")
    p.add_argument("--resize-max-side", type=int, default=None, help="downscale longer image side to N px")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel input files")
    p.add_argument("--size-limit", type=int, default=None, help="bytes per shard before compression")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.resize_max_side is not None and args.resize_max_side < 1:
        p.error("--resize-max-side must be >= 1")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    for c in args.captions:
        if not os.path.isfile(c):
            p.error(f"--captions {c!r}: no such file")
    opts = BuildOptions(inputs=args.input, out=args.out, captions=args.captions,
                        resize_max_side=args.resize_max_side, workers=args.workers)
    if args.size_limit is not None:
        opts.size_limit = args.size_limit
    try:
        report = build_shards(opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("written", "rejected_total", "rejected",
                                             "unknown_caption_keys")}))
    if report["written"] == 0:
        print(f"make_shards: error: no usable sample was written; see {os.path.join(args.out, REPORT)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
