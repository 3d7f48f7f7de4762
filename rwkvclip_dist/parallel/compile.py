"""``model.compile``: ``torch.compile`` of the towers' blocks, applied from outside the model as the
other parallelism wrappers are (``training/components.py`` calls it after ``parallelize``).

Each block is compiled in place (``nn.Module.compile``: the module, its parameters and its
state-dict keys stay what they were, so checkpoints, ZeRO and conversion see the same model) with
``dynamic=False``: every step has the same shapes. The blocks of a tower share one class and, with
torch's inlining of built-in modules, one compiled graph, so a tower compiles once per input shape, not
once per block. The patch and token embeddings, the pooling and the loss stay eager.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, backend: str) -> int:
    """Compile every block of ``model.visual`` and ``model.text`` with ``backend``; the number compiled."""
    blocks = [block for tower in (model.visual, model.text) for block in tower.blocks]
    for block in blocks:
        block.compile(backend=backend, dynamic=False)
    return len(blocks)
