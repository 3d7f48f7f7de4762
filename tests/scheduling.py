"""How ``make test``'s two pytest-xdist workers (``-n 2 --dist loadgroup --no-loadscope-reorder``) share
the suite: which tests must run in one worker, and in what order the groups are handed out.

- One group per test file, so that a module-scoped fixture (a compiled extension, a training run that
  the file's tests read) is made once, not once per worker; the Slurm files share one group (their
  test clusters listen on fixed ports) and the users of each run of shared_runs.py share its group.
- The longest groups first (longest-processing-time order, measured: ``--durations`` of a two-worker
  run), so that no long group starts last while the other worker idles. Any group not named in
  ``LONGEST_FIRST`` follows in collection order.
"""
from __future__ import annotations

import pytest

# Seconds each took on a two-worker run (2 cores, 8 December 2026; "fresh": with its compile, which a
# fresh clone pays and a warm extension cache does not), longest first.
LONGEST_FIRST = (
    "slurm",                       # 143 s: the Slurm test clusters, four files
    "wkv_emulation",               # 100 s: the CUDA kernels' CPU emulation (v1 and v2 files)
    "test_reshard",                # 92 s
    "source_run",                  # 62 s: test_finetune + test_tensor_parallel_finetune
    "test_cuda_build",             # ~60 s fresh (4 s warm)
    "test_optim",                  # ~50 s fresh: DeepSpeed's CPU Adam build (4 s warm)
    "test_train_tensor_parallel",  # 49 s
)
SHARED_FILES = {"test_slurm": "slurm", "test_cuda_kernel_on_cpu": "wkv_emulation",
                "test_cuda_kernel_v2_on_cpu": "wkv_emulation"}


def _group_of_file(stem: str) -> str:
    return next((group for prefix, group in SHARED_FILES.items() if stem.startswith(prefix)), stem)


def plan_for_xdist(config, items) -> None:
    """Under ``--dist loadgroup``: every test in its group and the groups in the order above. The node
    id of a grouped item ends in ``@<group>``, which is how the controller sends a group to one worker;
    xdist 3.8 sets it through ``item._nodeid``, which pytest 9.2 no longer reads (node ids live in
    ``item._id``), so it is set here."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(_group_of_file(item.path.stem)))
    groups = {}
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        groups[item] = "_".join(names)
        if not item.nodeid.endswith("@" + groups[item]):
            item._id = coerce_node_id(f"{item.nodeid}@{groups[item]}")
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    # Stable: within a rank (and for every group not named) the collection order is kept.
    items.sort(key=lambda item: rank.get(groups[item], len(rank)))
