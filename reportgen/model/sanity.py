"""The model-randomisation sanity check of Adebayo et al. (NeurIPS 2018, "Sanity Checks for Saliency
Maps"), cascading: the blocks are re-initialised from the top down, one more at each step, and the
maps are made again from the randomised model. A map that barely changes does not depend on what
the model learnt.

The blocks are those the model's adapter names (:meth:`~reportgen.model.adapters.ModelAdapter.blocks`:
timm's ``blocks``, a transformers model's encoder layers), re-initialised in place as timm
initialises a ViT: matrices drawn from normal(0, 0.02), biases zero, every other parameter (norm
scales, layer scales) one; from a generator of its own with a fixed seed, so the global RNG is
untouched and every build draws the same weights. On leaving :func:`cascade` (also on an error) every
parameter of the blocks gets its own values back, bit for bit, from a copy of the blocks' weights
(most of a ViT's), so the user's weights are as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from reportgen.model.adapters import ModelAdapter

#: The seed of the re-initialised weights.
SANITY_SEED = 0

#: The standard deviation of re-initialised matrices (timm's ViT initialisation).
INIT_STD = 0.02


@torch.no_grad()
def reinitialise(block: torch.nn.Module, generator: torch.Generator) -> None:
    """Draw new weights for every parameter of ``block``, in place (see the module docstring)."""
    for name, parameter in block.named_parameters():
        if parameter.ndim >= 2:
            fresh = torch.empty(parameter.shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
            parameter.copy_(fresh)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)


@contextmanager
def cascade(adapter: ModelAdapter, seed: int = SANITY_SEED) -> Iterator[Iterator[int]]:
    """Within the ``with`` block, the steps of the cascade: iterating gives each block index, last
    block first, once that block (and every block after it) is re-initialised in the adapter's
    model. On exit the blocks' parameters are restored exactly.

    Raises:
        ValueError: the adapter names no blocks to re-initialise.
    """
    blocks = adapter.blocks()
    if not blocks:
        raise ValueError(f"reportgen cannot re-initialise the blocks of a {adapter.library} model of this kind")
    saved = [[p.detach().clone() for p in block.parameters()] for block in blocks]
    generator = torch.Generator().manual_seed(seed)

    def steps() -> Iterator[int]:
        for index in reversed(range(len(blocks))):
            reinitialise(blocks[index], generator)
            yield index

    try:
        yield steps()
    finally:
        with torch.no_grad():
            for block, values in zip(blocks, saved):
                for parameter, value in zip(block.parameters(), values):
                    parameter.copy_(value)
