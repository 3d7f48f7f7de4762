"""Starts a run (:func:`~rwkvclip_dist.training.loop.start_run`), runs its ``Trainer`` and turns the ways a run ends into exit statuses.

    0  completed, or pre-empted (SIGTERM/SIGUSR1) after saving: a requeue resumes
    1  a checkpoint could not be written or read safely (no space, damaged, refused), or a crash
    2  the recipe is invalid (nothing started)
    3  a peer rank was lost (killed, frozen, its node gone): nothing more can be saved
    4  this rank's launcher is gone: the ranks saved and stopped rather than train on as orphans
    5  another live trainer holds the run directory (nothing was written)

A rank that lost a peer leaves with ``os._exit``: the broken process group's destructors (and
DeepSpeed's) may wait on the dead rank forever.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from rwkvclip_dist.checkpoint.integrity import CheckpointError
from rwkvclip_dist.cli import user_errors
from rwkvclip_dist.parallel.failures import EXIT_PEER_LOST, is_peer_loss, peer_loss_message
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.training.components import RunComplete
from rwkvclip_dist.training.ownership import RunDirectoryBusy
from rwkvclip_dist.training.recipe import Recipe

EXIT_LAUNCHER_LOST = 4
EXIT_BUSY = 5


def run_training(recipe: Recipe, run_dir: Path, launch: LaunchEnv, debug: bool = False) -> dict:
    """Train; on failure print one line and exit with the status above (``debug``: a mistake in the
    run's setup shows its traceback instead)."""
    # Here, not at the top: DeepSpeed, Streaming and the model load only once the recipe is known good.
    from rwkvclip_dist.training.loop import start_run

    # What exists once the libraries are imported (millions of objects: torch, DeepSpeed, dynamo), and
    # again once the run is set up, lives as long as the process: frozen, Python's full collections stop
    # walking it over and over (measured: ~1.2 s of CPU per rank at start; benchmarks/startup.md).
    # Set-up's own garbage is collected first, so that no tensor left in a cycle is frozen with it.
    gc.freeze()
    trainer = None
    try:
        with user_errors("train.py", debug):  # setup: evaluation data, checkpoint compatibility...
            trainer = start_run(recipe, run_dir, launch)
        gc.collect()
        gc.freeze()
        metrics = trainer.run()
    except RunComplete as done:
        if launch.rank == 0:
            print(f"train.py: {done}", file=sys.stderr, flush=True)
        return json.loads((run_dir / "metrics.json").read_text())
    except RunDirectoryBusy as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BUSY)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        logging.shutdown()
        # The other ranks may be inside DeepSpeed's save, waiting for this one.
        os._exit(1)
    except Exception as err:
        if not is_peer_loss(err):
            raise
        waited = None if trainer is None else time.monotonic() - trainer.last_progress
        print(f"error: {peer_loss_message(err, launch.rank, recipe.parallel.timeout_s, waited)}",
              file=sys.stderr, flush=True)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_PEER_LOST)
    if metrics["status"] == "launcher_lost":
        sys.exit(EXIT_LAUNCHER_LOST)
    return metrics
