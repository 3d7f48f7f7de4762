"""``make demo``: train the tiny model on the digits with 2 CPU ranks and print its zero-shot accuracy.

    python -m rwkvclip_dist.demo [--nproc 2] [--run-dir runs/demo_digits] [key.sub=value ...]

Builds the digits shards on first use (``data/demo_digits``, as ``tools/make_demo_data.py`` does),
starts ``torchrun`` on ``recipes/demo_digits.yaml``, removes Streaming shared memory that earlier
killed runs left in /dev/shm, and prints the held-out zero-shot top-1 from the run's
``metrics.json``. Any existing run directory is started afresh.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data
from rwkvclip_dist.data.shm import clean_stale_shm
from rwkvclip_dist.parallel.launch_env import free_port

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "demo_digits.yaml"
DATA = REPO / "data" / "demo_digits"  # where the recipe's data paths point
TARGET_TOP1 = 0.90


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (CPU processes) to train with")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo_digits"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)

    run_dir = Path(args.run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo always trains from scratch rather than resuming
    ensure_demo_data(str(DATA))
    clean_stale_shm()
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
           f"--master-port={free_port()}", "--max-restarts=0", str(REPO / "rwkvclip_dist" / "train.py"),
           "--recipe", str(RECIPE), "--run-dir", str(run_dir), *args.overrides]
    print("+", " ".join(cmd), flush=True)
    started = time.perf_counter()
    try:
        returncode = subprocess.run(cmd, env=env).returncode  # the recipe's paths do not depend on the cwd
    finally:
        clean_stale_shm()
    elapsed = time.perf_counter() - started
    if returncode != 0:
        print(f"demo: training failed (exit {returncode}); see the log above", file=sys.stderr)
        return returncode
    metrics = json.loads((run_dir / "metrics.json").read_text())
    top1 = metrics.get("zeroshot_top1")
    if top1 is None:
        print("demo: the run wrote no zero-shot result", file=sys.stderr)
        return 1
    verdict = "PASS" if top1 >= TARGET_TOP1 else "BELOW TARGET"
    print(f"\nzero-shot top-1 on {metrics.get('zeroshot_n', '?')} held-out digits: {top1:.1%} "
          f"(chance 10%, target {TARGET_TOP1:.0%}: {verdict}); {metrics['steps']} steps, "
          f"final loss {metrics['final_loss']:.3f}, {elapsed:.0f} s wall; metrics in {run_dir / 'metrics.json'}")
    return 0 if top1 >= TARGET_TOP1 else 2


if __name__ == "__main__":
    sys.exit(main())
