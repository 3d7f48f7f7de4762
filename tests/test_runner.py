"""training/runner.py's own duties besides exit statuses (those: tests/test_cli.py, test_rank_failures.py)."""
from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import torch


def test_a_run_freezes_what_set_up_made_but_collects_its_garbage_first(monkeypatch, tmp_path):
    """The runner freezes the objects that live as long as the rank (the imports', then set-up's), so
    that Python's full collections stop walking them (benchmarks/startup.md); a tensor that set-up left
    in a reference cycle must still be freed, not frozen for the run's lifetime."""
    from rwkvclip_dist.training import loop, runner

    seen, garbage = {}, []

    class Trainer:
        kept = torch.zeros(4)  # lives with the trainer: frozen, not freed

        def run(self) -> dict:
            seen.update(frozen=gc.get_freeze_count(), garbage_freed=garbage[0]() is None)
            return {"status": "completed"}

    def start_run(recipe, run_dir, launch) -> Trainer:
        cycle = {"tensor": torch.zeros(1 << 16)}
        cycle["self"] = cycle
        garbage.append(weakref.ref(cycle["tensor"]))
        return Trainer()

    monkeypatch.setattr(loop, "start_run", start_run)
    before = gc.get_freeze_count()
    try:
        assert runner.run_training(None, tmp_path, SimpleNamespace(rank=0)) == {"status": "completed"}
    finally:
        gc.unfreeze()  # the test process's own objects go back to the collector
    assert seen["frozen"] > before
    assert seen["garbage_freed"]
