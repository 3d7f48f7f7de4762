"""What ptxas says about each compiled kernel (``-Xptxas -v``): registers, shared memory, stack and
spills per kernel and architecture, parsed from the build log and printed as a table."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reported for one kernel on one architecture."""

    kernel: str
    arch: str
    registers: int
    static_smem: int
    stack: int
    spill_stores: int
    spill_loads: int


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SWEEP = re.compile(r"sweep_kernelILi(\d+)ELNS_5SweepE(\d)E")
_FUSED = re.compile(r"fused_kernelILi(\d+)ELNS_5FusedE(\d)ELi(\d)E")
_KINDS = {"0": "forward", "1": "query", "2": "key"}
_FUSED_KINDS = {"0": "forward", "1": "backward"}
_TYPES = {"0": "fp32", "1": "bf16", "2": "fp16"}  # InputType of csrc/bi_wkv/sweep_params.h


def _readable(mangled: str) -> str:
    """sweep<N=64, key> (v1, one kernel for every dtype) or v2<N=64, backward, bf16>."""
    if match := _SWEEP.search(mangled):
        return f"sweep<N={match.group(1)}, {_KINDS[match.group(2)]}>"
    if match := _FUSED.search(mangled):
        return f"v2<N={match.group(1)}, {_FUSED_KINDS[match.group(2)]}, {_TYPES[match.group(3)]}>"
    return mangled


def ptxas_report(log: str) -> list[KernelResources]:
    """Parse `-Xptxas -v` output: one entry per (kernel, architecture)."""
    rows, current, frame = [], None, (0, 0, 0)
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current, frame = (_readable(m.group(1)), m.group(2)), (0, 0, 0)
        elif (m := _FRAME.search(line)) and current:
            frame = tuple(int(x) for x in m.groups())
        elif (m := _USED.search(line)) and current:
            rows.append(KernelResources(current[0], current[1], int(m.group(1)), int(m.group(2) or 0), *frame))
            current = None
    return rows


def format_report(rows: list[KernelResources], dynamic_smem: dict[int, int]) -> str:
    """A table of the report; `dynamic_smem` maps head size to the sweep kernels' dynamic bytes."""
    lines = [f"{'kernel':28} {'arch':6} {'regs':>4} {'smem(dyn+static)':>17} {'stack':>5} {'spill st/ld':>11}"]
    def head_size(row: KernelResources) -> int:
        match = re.search(r"N=(\d+)", row.kernel)
        return int(match.group(1)) if match else 0

    for row in sorted(rows, key=lambda r: (r.arch, head_size(r), r.kernel)):
        dyn = dynamic_smem.get(head_size(row), 0)
        lines.append(f"{row.kernel:28} {row.arch:6} {row.registers:>4} {dyn + row.static_smem:>17} "
                     f"{row.stack:>5} {row.spill_stores:>5}/{row.spill_loads:<5}")
    return "\n".join(lines)
