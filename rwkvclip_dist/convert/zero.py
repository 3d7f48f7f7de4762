"""DeepSpeed ZeRO checkpoint directory (any stage, any world size) -> one consolidated state dict.

DeepSpeed's own ``zero_to_fp32`` does the merging of the partitioned fp32 master weights; it
unpickles with ``weights_only=False``. We run it with ``torch.load`` forced to ``weights_only=True``
and allow-list only the few plain DeepSpeed types its files hold, so a checkpoint directory can
never execute code while it is read.

Under tensor parallelism every TP rank has its own files (``..._mp_rank_XX_...``) and ``zero_to_fp32``
handles one TP rank at a time: each rank's files are linked into a scratch directory under the names
of TP rank 0, consolidated there, and the TP ranks' state dicts are merged by
``parallel.tensor_parallel.merge_shards``. The EMA (``ema=True``) goes the same way, each TP rank's
consolidation fed the EMA partitions of that TP rank's data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import re
import tempfile
from pathlib import Path

import torch

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.checkpoint.manager import CLIENT_FILE, CheckpointManager, read_latest
from rwkvclip_dist.checkpoint.safe_load import deepspeed_types_allowed
from rwkvclip_dist.parallel.tensor_parallel import merge_shards
from rwkvclip_dist.pretrained_format import strip_prefixes

TP_RANK_PATTERN = re.compile(r"mp_rank_(\d+)_")


@contextlib.contextmanager
def _weights_only_loads():
    original = torch.load

    @functools.wraps(original)
    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        with deepspeed_types_allowed():
            yield
    finally:
        torch.load = original


def tensor_parallel_size(tag_dir: Path) -> int:
    """How many tensor-parallel ranks wrote the DeepSpeed files of one checkpoint tag."""
    ranks = {int(m.group(1)) for p in tag_dir.glob("*_model_states.pt") if (m := TP_RANK_PATTERN.search(p.name))}
    if ranks and ranks != set(range(len(ranks))):
        raise FileNotFoundError(f"{tag_dir}: model-state files of tensor-parallel ranks {sorted(ranks)}; some are missing")
    return max(len(ranks), 1)


def _tensor_parallel_rank_state(checkpoint_dir: Path, tag: str, tp_rank: int, tp_size: int,
                                ema: bool) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    marker = f"mp_rank_{tp_rank:02d}_"
    with tempfile.TemporaryDirectory(prefix="tp_rank_") as scratch:
        (Path(scratch) / tag).mkdir()
        for path in (checkpoint_dir / tag).glob(f"*{marker}*"):
            (Path(scratch) / tag / path.name.replace(marker, "mp_rank_00_")).symlink_to(path.resolve())
        with _ema_in_place_of_master(checkpoint_dir / tag, tp_rank, tp_size) if ema else contextlib.nullcontext():
            return get_fp32_state_dict_from_zero_checkpoint(scratch, tag=tag)


@contextlib.contextmanager
def _ema_in_place_of_master(tag_dir: Path, tp_rank: int = 0, tp_size: int = 1):
    """DeepSpeed's merging of fp32 partitions, fed each rank's EMA partitions (``training/ema.py``,
    saved in the rank files) instead of its master weights: the EMA has the master's layout. Under
    tensor parallelism DeepSpeed merges one TP rank's data-parallel partitions at a time; data-parallel
    rank ``d`` of TP rank ``t`` is global rank ``d * tp_size + t`` (TP innermost, ``parallel/groups.py``)."""
    from deepspeed.utils import zero_to_fp32

    from rwkvclip_dist.checkpoint.manager import rank_file
    from rwkvclip_dist.checkpoint.safe_load import load_weights_only

    original = zero_to_fp32.parse_optim_states

    def parse_with_ema(files, ds_checkpoint_dir):
        stage, world, groups, paddings = original(files, ds_checkpoint_dir)
        ema = []
        for dp_rank in range(world):
            path = tag_dir / rank_file(dp_rank * tp_size + tp_rank)
            state = load_weights_only(path) if path.is_file() else {}
            if not (state.get("ema") or {}).get("partitions"):
                raise ValueError(f"{tag_dir}: no EMA in {path.name} (the run had no train.ema, or it had not "
                                 f"updated yet)")
            ema.append(state["ema"]["partitions"])
        sizes = lambda rows: [[t.numel() for t in g] for g in rows]  # noqa: E731
        # DeepSpeed saves the master partitions without the alignment padding at their end.
        if len(ema) != len(groups) or any(len(e) != len(g) or any(a.numel() < b.numel() for a, b in zip(e, g))
                                          for e, g in zip(ema, groups)):
            raise ValueError(f"{tag_dir}: the EMA partitions {sizes(ema)} do not fit the optimizer's {sizes(groups)}")
        ema = [[a[:b.numel()] for a, b in zip(e, g)] for e, g in zip(ema, groups)]
        return stage, world, ema, paddings

    zero_to_fp32.parse_optim_states = parse_with_ema
    try:
        yield
    finally:
        zero_to_fp32.parse_optim_states = original


def load_zero_checkpoint(checkpoint_dir: str | Path, tag: str | None = None,
                         split_dims: dict[str, int] | None = None, ema: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO 1/2/3 checkpoint directory (``latest`` tag by default).

    A checkpoint written by several tensor-parallel ranks needs ``split_dims``
    (``parallel.tensor_parallel.split_dims`` of the trained model) to merge their shards. ``ema``:
    the run's EMA of the weights (``train.ema``) instead of the weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"DeepSpeed checkpoint directory {checkpoint_dir} does not exist")
    tag = tag or read_latest(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir} has no 'latest' file; pass the tag (e.g. step_00000400)")
    if not (checkpoint_dir / tag).is_dir():
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{checkpoint_dir} has no checkpoint {tag!r}; it has {', '.join(tags) or 'none'}")
    tp = tensor_parallel_size(checkpoint_dir / tag)
    if tp > 1 and split_dims is None:
        raise ValueError(f"{checkpoint_dir / tag} holds {tp} tensor-parallel shards; merging them needs the "
                         f"model that was trained (the run's client_state.pt record, or --model)")
    try:
        with _weights_only_loads():
            if tp == 1:
                with _ema_in_place_of_master(checkpoint_dir / tag) if ema else contextlib.nullcontext():
                    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
            else:
                shards = [strip_prefixes(_tensor_parallel_rank_state(checkpoint_dir, tag, r, tp, ema))
                          for r in range(tp)]
                state = merge_shards(shards, split_dims)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise ValueError(f"{checkpoint_dir}: DeepSpeed could not read the checkpoint (truncated or corrupt, or "
                         f"not a ZeRO checkpoint): {(str(err).strip().splitlines() or [''])[0]}") from None
    state = strip_prefixes({k: v.float() for k, v in state.items()})
    # The trainer hands DeepSpeed 0-dim parameters as shape [1] (rwkvclip_dist/parallel/engine.py).
    for scalar in ("logit_scale", "logit_bias"):
        if scalar in state and state[scalar].shape == (1,):
            state[scalar] = state[scalar].reshape(())
    return state


def trained_model(checkpoint_dir: str | Path, tag: str | None = None) -> tuple[str, dict] | None:
    """``(registry name, overrides)`` of the model a run of this project trained, read from the
    recipe its checkpoint records; None for a checkpoint another program wrote."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or read_latest(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag / CLIENT_FILE).is_file():
        return None
    try:
        name, overrides = CheckpointManager(checkpoint_dir).read_record(tag).model_section()
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    return None if name is None else (name, overrides)
