"""``logging.wandb``: Weights & Biases beside TensorBoard, on rank 0.

The run id is chosen by rank 0 when the run first starts and kept in :class:`TrainState` (saved with
every checkpoint), so a resumed or requeued run opens the same wandb run (``resume="allow"``) instead
of a new one. ``wandb`` is an optional dependency (the ``wandb`` extra): it is imported only when a
recipe enables this section, and a recipe that does so without it installed is refused at load.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rwkvclip_dist.typed_config import FieldError

MODES = ("online", "offline", "disabled")


@dataclass
class WandbSection:
    """The ``logging.wandb:`` section of a recipe; off while ``project`` is empty."""

    project: str = ""
    entity: str = ""
    """The wandb user or team (empty: the account's default)."""
    mode: str = "online"
    """online | offline (run files under RUN_DIR/wandb, for ``wandb sync`` later) | disabled."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FieldError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.enabled:
            try:
                import wandb  # noqa: F401  (only when enabled: the package is optional)
            except ImportError as err:
                raise FieldError("project", "logging.wandb needs the wandb package, which is not installed: "
                                 "pip install 'rwkvclip_dist[wandb]' (or remove logging.wandb)") from err

    @property
    def enabled(self) -> bool:
        return bool(self.project)


def new_run_id() -> str:
    return secrets.token_hex(6)


def open_wandb_run(section: WandbSection, run_dir: Path, state, config: dict[str, Any], is_main: bool):
    """On rank 0 with the section enabled: the wandb run of ``state.wandb_run_id`` (a new id when the
    run has none yet, recorded in ``state`` for the next checkpoint), files under ``run_dir/wandb``.
    None elsewhere."""
    if not (is_main and section.enabled):
        return None
    import wandb

    state.wandb_run_id = state.wandb_run_id or new_run_id()
    return wandb.init(project=section.project, entity=section.entity or None, mode=section.mode,
                      id=state.wandb_run_id, resume="allow", dir=str(run_dir), config=config, name=run_dir.name)
