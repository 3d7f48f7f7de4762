"""Resuming on another number of data-parallel ranks, optimizer included.

A ZeRO checkpoint is partitioned by data-parallel rank: the fp32 master weights and Adam moments of
rank r are one flat slice of every parameter group, cut for the world size that wrote it. When the
run's record says it was written on another data-parallel size than this run's, the checkpoint is
converted once into DeepSpeed's universal form (one file per parameter and state, in
``<tag>/universal/``, written beside the original files and never over them) and loaded from there,
which re-partitions every state over this run's ranks (``parallel.deepspeed_compat``).

The tensor-parallel degree must stay what it was (checked before any engine starts); only the
data-parallel size changes. With the same global batch (``data.batch_size`` x data-parallel ranks)
the run continues exactly, only the reduction order differs; with another one it continues too,
and says so, since the learning rate was tuned for the old batch.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rwkvclip_dist.checkpoint.record import RunRecord
from rwkvclip_dist.checkpoint.safe_load import deepspeed_safe_globals, load_weights_only
from rwkvclip_dist.parallel import collectives

log = logging.getLogger(__name__)
UNIVERSAL_DIR = "universal"
COMPLETE_MARKER = "complete"
"""Written last into ``<tag>/universal/``: a conversion cut off half-way is redone, never loaded."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    tensor_parallel: int
    global_batch: int | None
    """Samples per optimizer step over all ranks; None for a record without its recipe."""

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel


def saved_topology(record: RunRecord) -> Topology | None:
    """What the record of a checkpoint says about the run that wrote it (None: a record without the
    run's recipe, which only a program other than the trainer writes, e.g. the fault tests)."""
    if not record.recipe:
        return None
    tp, world = record.tensor_parallel, record.world_size
    batch = (record.recipe.get("data") or {}).get("batch_size")
    return Topology(world, tp, None if batch is None else int(batch) * (world // tp))


def needs_universal(saved: Topology, current: Topology) -> bool:
    return saved.data_parallel != current.data_parallel


def describe_change(tag_dir: Path, saved: Topology, current: Topology) -> str:
    """The one log line of a resume across data-parallel sizes."""
    line = (f"checkpoint {tag_dir} was written on {saved.world_size} rank(s) (data parallel "
            f"{saved.data_parallel}), this run has {current.world_size} (data parallel {current.data_parallel}): "
            f"loading it through DeepSpeed's universal checkpoint, fp32 master weights and Adam moments "
            f"re-partitioned")
    if saved.global_batch is not None and saved.global_batch != current.global_batch:
        line += (f"; the global batch changes from {saved.global_batch} to {current.global_batch} samples, "
                 f"the run continues with it (the learning rate is the recipe's, not rescaled)")
    elif saved.global_batch is not None:
        line += f"; same global batch ({current.global_batch})"
    return line


def universal_folder(tag_dir: Path) -> Path:
    """Collective: ``<tag>/universal``, converted by rank 0 unless a complete one is already there."""
    from rwkvclip_dist.parallel import deepspeed_compat

    target = tag_dir / UNIVERSAL_DIR
    error = None
    if collectives.rank() == 0 and not (target / COMPLETE_MARKER).is_file():
        partial = tag_dir / (UNIVERSAL_DIR + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        try:
            output = deepspeed_compat.convert_to_universal(tag_dir, partial, deepspeed_safe_globals())
            (partial / COMPLETE_MARKER).write_text("converted by ds_to_universal\n")
            partial.rename(target)
        # What DeepSpeed's converter raises when it meets a checkpoint it cannot handle.
        except (OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                AssertionError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            error = f"could not convert checkpoint {tag_dir} to DeepSpeed's universal form: {type(err).__name__}: {err}"
        else:
            log.debug("ds_to_universal output:\n%s", output)
    error = collectives.broadcast_object(error)
    if error is not None:
        from rwkvclip_dist.checkpoint.integrity import CheckpointError

        raise CheckpointError(error)
    return target


def load(engine, tag_dir: Path, record: RunRecord, current: Topology | None) -> str | None:
    """Collective: load the DeepSpeed part of checkpoint ``tag_dir`` into ``engine``, through its
    universal form when ``record`` says it was written on another data-parallel size than ``current``
    (one log line). Returns DeepSpeed's load path (None when it could not load)."""
    from rwkvclip_dist.parallel import deepspeed_compat

    saved = saved_topology(record)
    if current is None or saved is None or not needs_universal(saved, current):
        load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        return load_path
    log.info("%s", describe_change(tag_dir, saved, current))
    return deepspeed_compat.load_universal(engine, universal_folder(tag_dir), load_weights_only)
