#!/usr/bin/env python
"""Build the demo digits data set (train + held-out MDS shards, zeroshot.json); deterministic.

    python tools/make_demo_data.py --out data/demo_digits
"""

from __future__ import annotations

import argparse
import sys


from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_demo_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    return p


def run(args: argparse.Namespace) -> int:
    print(ensure_demo_data(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
