"""Progress bars for evaluation loops (tqdm on stderr, silenced off rank 0 or by RWKVCLIP_NO_PROGRESS)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from tqdm import tqdm


def progress(iterable: Iterable, desc: str, total: int | None = None, disable: bool = False) -> Iterable:
    disable = disable or bool(os.environ.get("RWKVCLIP_NO_PROGRESS"))
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=False, dynamic_ncols=True)
