"""The model-randomisation sanity check of Adebayo et al. (NeurIPS 2018, "Sanity Checks for Saliency
Maps"), cascading: the blocks are re-initialised from the top down, one more at each step, and the
maps are made again from the randomised model. A map that barely changes does not depend on what
the model learnt.

The check runs on a copy of the model (the user's is never touched) re-initialised as timm
initialises a ViT: matrices drawn from normal(0, 0.02), biases zero, every other parameter (norm
scales, layer scales) one; from a generator of its own with a fixed seed, so the global RNG is
untouched and every build draws the same weights.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

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


def cascade(model: torch.nn.Module, seed: int = SANITY_SEED) -> Iterator[tuple[int, torch.nn.Module]]:
    """``(block index, model)`` after each step: a copy of ``model`` with blocks ``index`` to the
    last re-initialised (the same copy, one more block each step; last block first)."""
    generator = torch.Generator().manual_seed(seed)
    randomised = copy.deepcopy(model)
    for index in reversed(range(len(randomised.blocks))):
        reinitialise(randomised.blocks[index], generator)
        yield index, randomised
