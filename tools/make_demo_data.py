#!/usr/bin/env python
"""Build the demo digits data set (train + held-out MDS shards, zeroshot.json); deterministic.

    python tools/make_demo_data.py --out data/demo_digits
"""

from __future__ import annotations

import argparse
import sys


from rwkvclip_dist.data.demo_digits import ensure_demo_data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    args = p.parse_args(argv)
    try:
        path = ensure_demo_data(args.out)
    except FileExistsError as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
