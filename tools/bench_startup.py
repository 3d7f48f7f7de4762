"""What freezing the imported and set-up objects (``gc.freeze`` in rwkvclip_dist/training/runner.py) saves
a training run, measured against the same run with Python's collector left as it is.

    python tools/bench_startup.py                  # 2 ranks x 6 steps of the demo recipe, 3 runs each way
    python tools/bench_startup.py --steps 30 --repeats 5

Each run starts its ranks as the deepspeed launcher does (RANK, WORLD_SIZE, MASTER_* set, one
interpreter per rank) on the demo digits (built in a temporary folder unless --data names them). The
baseline runs the same train.py with ``gc.freeze`` made a no-op; the two kinds of run alternate so
that both see the same machine. Prints the median wall time and CPU time (all processes of the run)
and their ratio to the baseline.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rwkvclip_dist.cli import run_tool

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "rwkvclip_dist" / "train.py"
UNFROZEN = ("import gc, runpy, sys; gc.freeze = lambda: None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_startup.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default=None, help="demo digits folder (default: built in a temporary folder)")
    return parser


def _one_run(args: argparse.Namespace, data: str, run_dir: str, frozen: bool) -> tuple[float, float]:
    """(wall s, CPU s of every process of the run) of one short training run."""
    from rwkvclip_dist.parallel.launch_env import LaunchEnv, free_port, rank_variables

    command = [sys.executable, "-u", str(TRAIN)] if frozen else [sys.executable, "-u", "-c", UNFROZEN, str(TRAIN)]
    command += ["--recipe", str(REPO / "recipes" / "demo_digits.yaml"), "--run-dir", run_dir,
                f"data.streams=[{{remote: {data}/train}}]", "data.batch_size=16", "eval.zeroshot=[]",
                "logging.progress_bar=false", "logging.tensorboard=false", f"train.steps={args.steps}",
                "parallel.zero_stage=2"]
    port, n = free_port(), args.ranks
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    ranks = [subprocess.Popen(command, env={**os.environ, **rank_variables(LaunchEnv(r, n, r, n, "127.0.0.1", port,
                                                                                      "torchrun"))},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(n)]
    errors = [proc.communicate()[1] for proc in ranks]
    wall = time.perf_counter() - started
    for rank, (err, proc) in enumerate(zip(errors, ranks)):
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} exited with status {proc.returncode}: {err[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        data = args.data
        if data is None:
            from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data

            data = ensure_demo_data(os.path.join(scratch, "demo_digits"))
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for repeat in range(args.repeats):
            for frozen in (False, True):
                results[frozen].append(_one_run(args, data, os.path.join(scratch, f"run_{frozen}_{repeat}"), frozen))
    base_wall = statistics.median(w for w, _ in results[False])
    base_cpu = statistics.median(c for _, c in results[False])
    print(f"{args.ranks} ranks x {args.steps} steps of the demo recipe (ZeRO-2, CPU), median of {args.repeats} runs each")
    print("| collector | wall s | CPU s | wall ratio | CPU ratio |")
    print("|---|---:|---:|---:|---:|")
    for frozen, name in ((False, "as Python leaves it (baseline)"), (True, "gc.freeze after imports and set-up")):
        wall = statistics.median(w for w, _ in results[frozen])
        cpu = statistics.median(c for _, c in results[frozen])
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {wall / base_wall:.2f} | {cpu / base_cpu:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
