"""Every random stream of a training process, in one place: seeding, capture and restore.

Three users: the run seeds all generators at start-up (:func:`seed_all`), the checkpoint keeps each
rank's full state (:func:`capture` / :func:`restore`, through ``TrainState``), and gradient
accumulation replays the torch streams of a micro-batch so stochastic depth drops the same paths in
its second forward (:func:`torch_streams` / :func:`set_torch_streams`).

Captured states are plain tensors, ints and tuples, so checkpoints load with ``weights_only=True``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device's) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture() -> dict[str, Any]:
    """The state of every generator of this process."""
    bit_generator, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": bit_generator, "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Put back a state of :func:`capture`."""
    random.setstate(_as_tuples(state["python"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["bit_generator"], numpy["key"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate insists on tuples; a serialiser may hand lists back.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def torch_streams() -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's CPU stream and the current CUDA device's (when CUDA is in use), for a replay."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_torch_streams(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])
