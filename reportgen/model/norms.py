"""The L2 norm of every token entering every block, captured during the forward pass.

Vision Transformers trained without register tokens grow a few high-norm "artefact" tokens in
background patches that soak up attention (Darcet et al., "Vision Transformers Need Registers",
ICLR 2024). Their norms show it, and cost one ``[B, N]`` vector per layer to keep. A block's input
is what its attention reads, so layer ``l``'s norms describe the tokens layer ``l`` attends over.

The blocks are the modules that hold each attention module (``blocks.3`` for ``blocks.3.attn``);
their hooks live only inside :class:`TokenNormCapture` and are removed on exit, also on error.
"""

from __future__ import annotations

import torch

from reportgen.errors import CaptureError
from reportgen.model.capture import Hooks, blocks_of


class TokenNormCapture(Hooks):
    """Context manager recording ``[B, N]`` token norms at each block's input.

    Args:
        model: the ViT.
        attention_names: the qualified names of its attention modules, first layer first (their
            parents are the blocks).
    """

    def __init__(self, model: torch.nn.Module, attention_names: tuple[str, ...]):
        super().__init__()
        self._blocks = blocks_of(model, attention_names)
        self._norms: list[torch.Tensor | None] = [None] * len(self._blocks)

    def _install(self) -> None:
        for index, (name, block) in enumerate(self._blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook(index, name)))

    def _hook(self, index: int, name: str):
        def hook(_block, inputs):
            tokens = inputs[0] if inputs else None
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                raise CaptureError(f"{name or 'a block'} does not take [batch, tokens, channels] tokens, so their norms cannot be read")
            self._norms[index] = tokens.detach().float().norm(dim=-1).cpu()

        return hook

    def norms(self) -> torch.Tensor:
        """``[B, L, N]`` float32 norms of the last forward pass."""
        if any(n is None for n in self._norms):
            raise CaptureError("token norms were not captured from every block")
        return torch.stack(self._norms, dim=1)
