"""Every use of DeepSpeed's private names, in one place, for the versions they were read from.

DeepSpeed does not promise these names; a release that renames one would otherwise fail deep inside a
run. Importing this module checks the installed version against ``WRITTEN_FOR`` and refuses, in one
line naming both, when it is outside (tests/test_layout.py checks that no other module touches
DeepSpeed's private names). Widen the range after reading the new release's code for each name here.

DeepSpeed's universal checkpoint (resume on another data-parallel size, ``checkpoint/reshard.py``) is
here too: a ZeRO checkpoint holds each data-parallel rank's flat partition of the fp32 master weights
and Adam moments and loads only on the world size that wrote it; ``ds_to_universal`` rewrites it as
one file per parameter and state (``zero/<name>/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``), and an
engine whose config has ``checkpoint.load_universal`` re-partitions those over its own ranks. The
converter's ``main`` and its argument names, the engine's ``_config``, the checkpoint-info key and its
pattern keys are the undocumented names it needs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rwkvclip_dist.versions import require_version

WRITTEN_FOR = ("0.19", "0.20")
"""Lowest version read, first version not read (pyproject.toml's bounds; CI runs 0.19.8)."""

require_version("deepspeed", WRITTEN_FOR, "rwkvclip_dist/parallel/deepspeed_compat.py")


def ensure_world_group(world_size: int, timeout: timedelta) -> None:
    """ZeRO runs its collectives on a clone of the world group that DeepSpeed creates on first use,
    with torch's default timeout (30 min gloo, 10 min NCCL), not ours: create it with ``timeout``."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = dist.new_group(ranks=list(range(world_size)), timeout=timeout)


MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def import_muon_lazily() -> None:
    """Import DeepSpeed's Muon optimizer module with its ``@compiler.compile()`` kernels compiled on first
    call instead of wrapped at import.

    Every ZeRO optimizer and the bf16 one import it (for an ``isinstance`` check) when built; wrapping
    a function in ``torch.compile`` imports torch._dynamo and inductor's ``compile_fx``: ~2.2 s of CPU
    and ~150 MB in every rank of every ZeRO run, for an optimizer no recipe uses. A Muon function that
    is called still runs compiled (``torch.compile`` at its first call)."""
    if any(name in sys.modules for name in MUON_MODULES):
        return
    from deepspeed.runtime import compiler

    def lazy_compile() -> Callable:
        def decorate(fn: Callable) -> Callable:
            compiled = None

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)
            return call
        return decorate

    stock, compiler.compile = compiler.compile, lazy_compile
    try:
        importlib.import_module(MUON_MODULES[1])
    finally:
        compiler.compile = stock


def skip_cpu_inference_all_reduce() -> None:
    """On the CPU accelerator, DeepSpeed's communication layer compiles and starts its shared-memory
    all-reduce (``deepspeed_shm_comm``: ~45 s of CPU to build on a fresh machine, which every first
    run waits for) for ``inference_all_reduce`` alone, which training never calls (its all-reduces are
    torch.distributed's, and ``inference_all_reduce`` falls back to them without the op)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # importlib: ``import deepspeed.comm.torch as m`` binds deepspeed.comm's attribute ``torch``, torch
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def zero3_fp32_partition(param: Any) -> Any:
    """This rank's slice of ZeRO-3's fp32 master copy of ``param`` (a tensor to edit in place)."""
    partition, _ = param._z3_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    return partition


def checkpoint_classes() -> list[type]:
    """The DeepSpeed classes its checkpoint files legitimately hold; none runs code when rebuilt."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def replace_checkpoint_loader(engine: Any, load: Callable[..., Any]) -> None:
    """Make ``engine`` read every checkpoint file (model, optimizer, ZeRO shards) with ``load(path,
    map_location)``: DeepSpeed's checkpoint engine calls ``torch.load(..., weights_only=False)``."""
    engine.checkpoint_engine.load = load


def describe_tensor_parallel(model: nn.Module, split_dims: dict[str, int]) -> None:
    """Tell DeepSpeed's converter how the tensor-parallel ranks' slices fit together (saved with
    every checkpoint): parameters not in ``split_dims`` are replicated, dimension 1 is a row split.

    A split along another dimension (the per-channel decay, dimension 2) is stacked along dimension 0
    by the converter and cut the same way on load: exact for the same tensor-parallel degree, which
    is the only one a checkpoint resumes on (the manager's resume check, ``checkpoint.record``).
    """
    from deepspeed.checkpoint.constants import (PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                                                TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_INFO,
                                                UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    names = [name for name, _ in model.named_parameters()]
    exact = [f"^{re.escape(name)}$" for name in names if name not in split_dims]
    rows = [f"^{re.escape(name)}$" for name in names if split_dims.get(name) == 1]
    info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if split_dims:
        info[TP_REPLICATED_PARAMETER_PATTERNS] = exact
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = rows
    # The engine saves this attribute of its module into every checkpoint's model-states file.
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, info)


@contextlib.contextmanager
def _data_only_torch_load(allowed: list) -> Iterator[None]:
    """The converter reads with ``torch.load(weights_only=False)``; here every read is data only."""
    original = torch.load

    def load(path, map_location=None, **_ignored):
        with torch.serialization.safe_globals(allowed):
            state = original(path, map_location=map_location or "cpu", weights_only=True)
        # megatron-core's layers put an `_extra_state` of None into the module's state dict; it holds
        # no weights, and the converter would write it out as a parameter (`None.float()`).
        if isinstance(state, dict) and isinstance(state.get("module"), dict):
            state["module"] = {k: v for k, v in state["module"].items() if v is not None}
        return state

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert_to_universal(source: Path, target: Path, allowed: list) -> str:
    """Write the universal form of the DeepSpeed checkpoint in ``source`` (one tag's folder) to
    ``target``; returns the converter's console output (it prints its progress)."""
    from deepspeed.checkpoint import ds_to_universal

    # One worker: the conversion runs in the trainer, whose CPU cores the other ranks share.
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    out = io.StringIO()
    with _data_only_torch_load(allowed), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        ds_to_universal.main(args)
    return out.getvalue()


def load_universal(engine, folder: Path, load_weights_only: Callable[[Path], Any]) -> str | None:
    """Load the universal checkpoint in ``folder`` (``<load dir>/<tag>``) into ``engine``; returns
    DeepSpeed's load path (None when it could not load)."""
    # DeepSpeed reads the switch from its config at load time; the recipe's config cannot know it
    # when the engine is built.
    config = engine._config
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    finally:
        config.load_universal_checkpoint = previous
    if load_path is not None and engine.zero_optimization_partition_weights():
        _repair_stage3_load(engine, folder, load_weights_only)
    return load_path


def _repair_stage3_load(engine, folder: Path, load_weights_only: Callable[[Path], Any]) -> None:
    """Undo two slips of ZeRO-3's universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``),
    each of which changes every step after the resume (tests/test_reshard.py catches both):

    - every parameter group gets the hyperparameters of group 0, so our no-decay group would be
      decayed: each group gets its own saved values back (its parameters are left alone);
    - one ``step`` tensor is shared by the states of all sub-groups, and torch's Adam increments it
      in place once per sub-group, so the bias correction runs ahead: each state gets its own copy.
    """
    base = engine.optimizer.optimizer
    saved = load_weights_only(folder / "zero" / "optimizer_state.pt")["param_groups"]
    if len(saved) != len(base.param_groups):
        raise RuntimeError(f"{folder}: the checkpoint has {len(saved)} optimizer parameter groups, this run "
                           f"{len(base.param_groups)}; they must be the same groups")
    for group, values in zip(base.param_groups, saved):
        group.update({key: value for key, value in values.items() if key != "params"})
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
