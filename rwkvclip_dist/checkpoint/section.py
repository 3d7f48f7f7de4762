"""The ``checkpoint:`` section of a recipe (read by the manager, the remote copy and the trainer)."""
from __future__ import annotations

from dataclasses import dataclass

from rwkvclip_dist.checkpoint.remote import check_url
from rwkvclip_dist.typed_config import FieldError, path_field


@dataclass
class CheckpointSection:
    """The ``checkpoint:`` section of a recipe."""

    dir: str = path_field("")
    """Where checkpoints go; empty means <run dir>/checkpoints."""
    every_steps: int = 1000
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest k complete checkpoints; older ones are deleted after a new one completes."""
    resume: bool = True
    """Resume automatically from the newest complete checkpoint in ``dir``."""
    remote: str = ""
    """``s3://bucket/prefix`` (``S3_ENDPOINT_URL``, ``AWS_*`` as for the data): checkpoints also go there,
    and a run whose ``dir`` has none resumes from there (``checkpoint.remote``). Empty: local only."""

    def __post_init__(self) -> None:
        check_url("remote", self.remote)
        if self.every_steps < 0:
            raise FieldError("every_steps", f"must be >= 0 (0: only at the end), got {self.every_steps}")
        if self.keep_last < 1:
            raise FieldError("keep_last", f"must be >= 1, got {self.keep_last}")
