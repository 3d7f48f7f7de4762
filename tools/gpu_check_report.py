"""Gather what tools/gpu_check.sh wrote into OUT_DIR/results.json and print its short table.

    python tools/gpu_check_report.py OUT_DIR MODE "FAILED STEPS"

Reads OUT_DIR/steps.tsv (step, exit code, seconds), bench_wkv.md, bench_train.json (with the
profile of one step), train/metrics.json and the build log's resource table, so that one file holds
every figure of the run. A file a failed step did not write is recorded as missing, not guessed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rwkvclip_dist.outputs import strict_json
from rwkvclip_dist.cli import run_tool


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def outcome(code: int) -> str:
    # 125: gpu_check.sh found too little of its --budget left to start the step
    return "ok" if code == 0 else "not run" if code == 125 else f"FAILED ({code})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="gpu_check.sh's OUT_DIR")
    p.add_argument("mode", help="gpu or cpu")
    p.add_argument("failed", nargs="?", default="", help="the failed steps, one argument separated by spaces")
    return p


def run(args: argparse.Namespace) -> int:
    out, mode, failed = args.out, args.mode, args.failed.split()
    if not (out / "steps.tsv").is_file():
        raise FileNotFoundError(f"{out / 'steps.tsv'}: no such file (is {out} gpu_check.sh's OUT_DIR?)")
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, code, seconds = line.split("\t")
        steps.append({"step": name, "exit_code": int(code), "seconds": int(seconds)})
    bench_wkv = out / "bench_wkv.md"
    build_log = out / "logs" / "build.log"
    results = {
        "mode": mode,
        "failed_steps": failed,
        "steps": steps,
        "total_seconds": sum(s["seconds"] for s in steps),
        "train": read_json(out / "train" / "metrics.json"),
        "bench_train": read_json(out / "bench_train.json"),
        "bench_wkv_table": bench_wkv.read_text() if bench_wkv.is_file() else None,
        "build_report": build_log.read_text().splitlines()[-30:] if build_log.is_file() else None,
        # what a failed step said last, so that results.json alone explains a failure
        "failed_logs": {name: (out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-60:]
                        for name in failed if (out / "logs" / f"{name}.log").is_file()},
    }
    (out / "results.json").write_text(strict_json(results, indent=2) + "\n")

    lines = ["", f"gpu_check ({mode} mode): {results['total_seconds']} s in all", "",
             "| step | result | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {outcome(s['exit_code'])} | {s['seconds']} |" for s in steps]
    if results["bench_wkv_table"]:
        rows = [line for line in results["bench_wkv_table"].splitlines()
                if line.startswith(("| T ", "|---")) or line.split("|")[1:2] in ([" 197 "], [" 4096 "])]
        lines += ["", "Bi-WKV forward+backward (tools/bench_wkv.py; every T in results.json):", *rows]
    train = results["train"]
    if train:
        lines += ["", f"training: steps {train.get('resumed_from_step')} -> {train.get('steps')}, final loss "
                      f"{train.get('final_loss')}, Bi-WKV calls {train.get('bi_wkv_calls', 'not recorded')}"]
    bench = results["bench_train"]
    if bench:
        lines += ["", f"training step on {bench['device']} ({bench['precision']}):",
                  "| case | batch | images/s | peak GiB | MFU |", "|---|---:|---:|---:|---:|"]
        for r in bench["results"]:
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
            speed = r["status"] if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
            lines.append(f"| {r['case']} | {r['batch']} | {speed} | {memory} | {mfu} |")
        top = next((r["profile"] for r in bench["results"] if r["profile"]), [])
        if top:
            lines += ["", "top kernels of one profiled step (self time, ms): "
                      + "; ".join(f"{p['name'][:40]} {p['self_ms']:.2f}" for p in top[:5])]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
