"""The steps of tools/gpu_check.sh: their order, estimates and limits, and which ones a run takes.

    python tools/gpu_check_plan.py plan --mode gpu [--only STEPS|left] [--wheelhouse] OUT_DIR
    python tools/gpu_check_plan.py record OUT_DIR STEP EXIT_CODE SECONDS
    python tools/gpu_check_plan.py left OUT_DIR

``plan`` prints one line per step to run (name, limit in seconds, estimate in seconds) and writes
the state file OUT_DIR/state.tsv (step, status, seconds; status is ``ok``, ``failed:<code>``,
``not_run`` or ``pending``); ``record`` sets one step's status; ``left`` prints the steps a run
left (every one not ``ok``), which is what ``--only left`` runs. The state file is cumulative: a
second call with ``--only`` keeps the first call's ``ok`` steps, so a third call picks up what
both left.

The steps come in the order of their value per second on a GPU (what a short allocation should
answer first): the environment and the build, a focused kernel test subset, the Bi-WKV
benchmark, the DeepSpeed bf16 run and its resume, the training-step benchmark, then the rest
(every other kernel test, the sanitizers). The estimates are for one H100 with 16 cores and are
not measurements (no GPU has run this yet): they must sum to at most TOTAL_ESTIMATE_S, which
tests/test_gpu_tools.py checks together with the header of gpu_check.sh that states them.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from rwkvclip_dist.cli import run_tool

TOTAL_ESTIMATE_S = 420  # 7 minutes: a 15-minute allocation less the machine's start and the copies


@dataclass(frozen=True)
class Step:
    name: str
    estimate_s: int
    """expected seconds on one H100 (an estimate, stated in gpu_check.sh's header)"""
    limit_s: int
    """the step is killed past this (about twice the estimate; x3 in --cpu mode)"""
    modes: tuple[str, ...] = ("gpu", "cpu")
    needs: tuple[str, ...] = ()
    """steps that must run again in a later call that runs this one (a fresh machine keeps nothing)"""


STEPS = (
    Step("wheelhouse", 15, 90),
    Step("env", 10, 60),
    Step("build", 70, 240, ("gpu",)),
    Step("baseline_build", 0, 600, ("cpu",)),  # nvcc on a small shared CPU machine: up to 15 minutes
    Step("kernel_focus", 30, 120, needs=("build",)),
    Step("bench_wkv", 53, 120, needs=("build",)),
    Step("demo_data", 5, 60),
    Step("train", 40, 150, needs=("build", "demo_data")),
    Step("train_resume", 25, 120, needs=("build", "demo_data", "train")),
    Step("train_checks", 2, 30, needs=("train",)),
    Step("bench_train", 80, 180, needs=("build",)),
    Step("kernel_rest", 50, 240, needs=("build",)),
    Step("sanitizer_memcheck", 10, 90, ("gpu",), needs=("build",)),
    Step("sanitizer_racecheck", 10, 120, ("gpu",), needs=("build",)),
    Step("sanitizer_synccheck", 10, 90, ("gpu",), needs=("build",)),
    Step("sanitizer_initcheck", 10, 90, ("gpu",), needs=("build",)),
    Step("sanitizer_cpu", 0, 120, ("cpu",)),
)
ALWAYS = ("wheelhouse", "env")  # a later call may land on a fresh machine: these set it up


class PlanError(ValueError):
    pass


def steps_for(mode: str, wheelhouse: bool) -> list[Step]:
    return [s for s in STEPS if mode in s.modes and (wheelhouse or s.name != "wheelhouse")]


def read_state(out: Path) -> dict[str, str]:
    path = out / "state.tsv"
    if not path.is_file():
        return {}
    return {name: status for name, status, _ in (line.split("\t") for line in path.read_text().splitlines())}


def write_state(out: Path, state: dict[str, str], seconds: dict[str, str]) -> None:
    (out / "state.tsv").write_text("".join(f"{n}\t{s}\t{seconds.get(n, '0')}\n" for n, s in state.items()))


def _seconds(out: Path) -> dict[str, str]:
    path = out / "state.tsv"
    return {} if not path.is_file() else {n: sec for n, _, sec in
                                          (line.split("\t") for line in path.read_text().splitlines())}


def left(out: Path) -> list[str]:
    return [name for name, status in read_state(out).items() if status != "ok"]


def select(mode: str, only: str | None, out: Path, wheelhouse: bool) -> list[Step]:
    """The steps of this call, in STEPS order. ``only``: None (all), ``left`` (what the state file
    says the earlier calls left), or names and prefixes separated by commas (``sanitizer`` is every
    sanitizer step). What a chosen step needs is added, except ``train`` when the run directory of
    an earlier ``ok`` train is still there (the same machine)."""
    available = steps_for(mode, wheelhouse)
    if only is None:
        return available
    by_name = {s.name: s for s in available}
    if only == "left":
        if not (out / "state.tsv").is_file():
            raise PlanError(f"{out / 'state.tsv'}: no state file of an earlier run to pick up from")
        wanted = set(left(out)) & set(by_name)
    else:
        wanted = set()
        for word in filter(None, only.split(",")):
            match = {n for n in by_name if n == word or n.startswith(word + "_")}
            if not match:
                raise PlanError(f"--only {word}: no such step in {mode} mode (steps: {', '.join(by_name)})")
            wanted |= match
    state = read_state(out)
    train_kept = state.get("train") == "ok" and (out / "train" / "metrics.json").is_file()
    changed = True
    while changed:  # needs of needs
        changed = False
        for name in list(wanted):
            for need in by_name[name].needs:
                if need in by_name and need not in wanted and not (need == "train" and train_kept):
                    wanted.add(need)
                    changed = True
    if wanted:
        wanted |= set(ALWAYS) & set(by_name)
    return [s for s in available if s.name in wanted]


def plan(mode: str, only: str | None, out: Path, wheelhouse: bool) -> list[Step]:
    """Select this call's steps and mark them pending in the state file (a full run starts afresh)."""
    chosen = select(mode, only, out, wheelhouse)
    state = {} if only is None else read_state(out)
    seconds = {} if only is None else _seconds(out)
    for s in chosen:
        state[s.name] = "pending"
    write_state(out, state, seconds)
    return chosen


def record(out: Path, name: str, code: int, seconds: int) -> None:
    state, times = read_state(out), _seconds(out)
    state[name] = "ok" if code == 0 else "not_run" if code == 125 else f"failed:{code}"
    times[name] = str(seconds)
    write_state(out, state, times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check_plan.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--only")
    p.add_argument("--wheelhouse", action="store_true")
    p.add_argument("out", type=Path)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("name")
    r.add_argument("code", type=int)
    r.add_argument("seconds", type=int)
    sub.add_parser("left").add_argument("out", type=Path)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "plan":
        for s in plan(args.mode, args.only, args.out, args.wheelhouse):
            print(s.name, s.limit_s * (3 if args.mode == "cpu" else 1), s.estimate_s)
    elif args.command == "record":
        record(args.out, args.name, args.code, args.seconds)
    else:
        print(",".join(left(args.out)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
