"""Attention, its gradient, token norms and the tokens each block's attention reads, from a
Hugging Face transformers ViT: the same context managers as :mod:`reportgen.model.capture`,
:mod:`reportgen.model.gradients` and :mod:`reportgen.model.norms` have for timm models.

Every attention module of the supported families returns ``(output, attention_probabilities)``;
with ``attn_implementation="eager"`` (how :func:`~reportgen.model.hf.load_hf_model` loads them)
the probabilities are the softmax the layer multiplies its values by, on the autograd graph. A
forward hook on each module reads them as the layer runs, rather than asking the model for
``output_attentions``, which would keep every layer's ``[B, H, N, N]`` matrix alive until the
forward pass ends. The SDPA and flash paths return ``None`` in their place; a layer that returned
no tensor is reported by ``check_complete``, never skipped.

Hooks live only inside the context managers and are removed on exit, also when an error is raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reportgen.errors import CaptureError
from reportgen.model.capture import CaptureInfo, Hooks, LayerCallback, some_names
from reportgen.model.gradients import GradientCallback

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reportgen.model.hf import HFArchitecture

CAPTURE_METHOD = (
    "the attention probabilities each transformers attention module returns with "
    "attn_implementation=\"eager\" (softmax(q kᵀ / √d), as output_attentions gives them), read by a "
    "forward hook on the module as its layer runs"
)


def _attention_of(output) -> torch.Tensor | None:
    """The attention probabilities in an attention module's output, if it returned them."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].dim() == 4:
        return output[1]
    return None


def _not_returned(model: torch.nn.Module, missing: list[str], total: int, graph: bool) -> CaptureError:
    implementation = getattr(model.config, "_attn_implementation", None)
    where = " on the autograd graph" if graph else ""
    return CaptureError(
        f"{len(missing)} of {total} attention layers returned no attention probabilities{where} "
        f"({some_names(missing)}); the model runs attn_implementation={implementation!r}, and only "
        "\"eager\" returns them. Refusing to draw from partial data."
    )


class HFAttentionCapture(Hooks):
    """Context manager handing every layer's attention probabilities to a callback; used as
    :class:`~reportgen.model.capture.AttentionCapture`.

    Args:
        model: a transformers ViT loaded with ``attn_implementation="eager"``.
        arch: its :class:`~reportgen.model.hf.HFArchitecture`.
        on_layer: called as ``on_layer(layer_index, attn)`` with ``attn`` float32 ``[B, H, N, N]``
            (detached), rows summing to 1, during the forward pass.
    """

    def __init__(self, model: torch.nn.Module, arch: HFArchitecture, on_layer: LayerCallback | None):
        super().__init__()
        self._model = model
        self._arch = arch
        self._on_layer = on_layer
        self._seen: set[int] = set()
        self.info = CaptureInfo(method=CAPTURE_METHOD, layers=arch.attention_names, fused_attention=0)

    def _install(self) -> None:
        for index, (_name, layer) in enumerate(self._arch.layers):
            module = getattr(layer, self._arch.attention)
            self._handles.append(module.register_forward_hook(self._hook(index)))

    def begin(self) -> None:
        """Start a new forward pass: forget which layers were seen."""
        self._seen.clear()

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every layer returned its attention since :meth:`begin`."""
        names = self.info.layers
        missing = [name for i, name in enumerate(names) if i not in self._seen]
        if missing:
            raise _not_returned(self._model, missing, len(names), graph=False)

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            attn = _attention_of(output)
            if attn is None:
                return  # check_complete reports the layer
            if self._on_layer is not None:
                self._on_layer(index, attn.detach().float())
            self._seen.add(index)

        return hook


class HFAttentionGradients(Hooks):
    """Context manager exposing every layer's attention and its gradient; used as
    :class:`~reportgen.model.gradients.AttentionGradients`.

    The eager attention a module returns is the tensor its values are weighted by, so a tensor
    hook on it sees the gradient of the target with respect to the attention.

    Args:
        model: a transformers ViT loaded with ``attn_implementation="eager"``.
        arch: its :class:`~reportgen.model.hf.HFArchitecture`.
        on_gradient: called as ``on_gradient(layer_index, attn, grad)`` with both ``[B, H, N, N]``
            and detached, once per layer during the backward pass, last layer first.
    """

    def __init__(self, model: torch.nn.Module, arch: HFArchitecture, on_gradient: GradientCallback):
        super().__init__()
        self._model = model
        self._arch = arch
        self._on_gradient = on_gradient
        self._attn: list[torch.Tensor | None] = [None] * len(arch.layers)

    def _install(self) -> None:
        for index, (_name, layer) in enumerate(self._arch.layers):
            module = getattr(layer, self._arch.attention)
            self._handles.append(module.register_forward_hook(self._hook(index)))

    def _remove(self) -> None:
        super()._remove()
        self._attn = [None] * len(self._arch.layers)

    def begin(self) -> None:
        """Start a new pass: forget the previous one's attention."""
        self._attn = [None] * len(self._arch.layers)

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every layer's attention is on the graph."""
        missing = [name for name, attn in zip(self._arch.attention_names, self._attn) if attn is None]
        if missing:
            raise _not_returned(self._model, missing, len(self._attn), graph=True)

    def first(self) -> torch.Tensor:
        """The first layer's attention: a backward pass down to it reaches every layer's."""
        assert self._attn[0] is not None, "no forward pass since begin()"
        return self._attn[0]

    def _hook(self, index: int):
        def hook(_module, _inputs, output):
            attn = _attention_of(output)
            if attn is None or not attn.requires_grad:
                return  # check_complete reports the layer
            self._attn[index] = attn

            # Through the list, not a closure over attn: emptying it on exit frees the matrix.
            def on_grad(grad: torch.Tensor) -> None:
                self._on_gradient(index, self._attn[index].detach(), grad.detach())

            attn.register_hook(on_grad)

        return hook


class HFBlockGradients(Hooks):
    """Context manager exposing the tokens each layer's attention reads (the output of its norm
    before attention: ``layernorm_before``, ``norm1`` or ``layer_norm1``), and their gradient;
    used as :class:`~reportgen.model.gradients.BlockGradients`.

    Args:
        model: a transformers ViT.
        arch: its :class:`~reportgen.model.hf.HFArchitecture`.
        on_gradient: called as ``on_gradient(block_index, tokens, grad)`` with both ``[B, N, C]``
            and detached, once per layer during the backward pass.
    """

    def __init__(self, model: torch.nn.Module, arch: HFArchitecture, on_gradient: GradientCallback):
        super().__init__()
        self._arch = arch
        self._names = [f"{name}.{arch.norm}" for name, _ in arch.layers]
        self._on_gradient = on_gradient
        self._tokens: list[torch.Tensor | None] = [None] * len(arch.layers)

    def _install(self) -> None:
        for index, (_name, layer) in enumerate(self._arch.layers):
            self._handles.append(getattr(layer, self._arch.norm).register_forward_hook(self._hook(index)))

    def _remove(self) -> None:
        super()._remove()
        self._tokens = [None] * len(self._arch.layers)

    def begin(self) -> None:
        """Start a new pass: forget the previous one's tokens."""
        self._tokens = [None] * len(self._arch.layers)

    def check_complete(self) -> None:
        """Raise :class:`CaptureError` unless every layer's tokens are on the autograd graph."""
        missing = [name for name, tokens in zip(self._names, self._tokens) if tokens is None]
        if missing:
            raise CaptureError(
                f"the tokens of {len(missing)} of {len(self._tokens)} layers were not [batch, tokens, channels] "
                f"on the autograd graph ({some_names(missing)}); refusing to draw from partial data"
            )

    def first(self) -> torch.Tensor:
        """The first layer's tokens: a backward pass down to them reaches every layer's."""
        assert self._tokens[0] is not None, "no forward pass since begin()"
        return self._tokens[0]

    def _hook(self, index: int):
        def hook(_norm, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 3 or not output.requires_grad:
                return  # check_complete reports the layer
            self._tokens[index] = output

            def on_grad(grad: torch.Tensor) -> None:
                self._on_gradient(index, self._tokens[index].detach(), grad.detach())

            output.register_hook(on_grad)

        return hook


class HFTokenNormCapture(Hooks):
    """Context manager recording ``[B, N]`` token norms at each layer's input; used as
    :class:`~reportgen.model.norms.TokenNormCapture`.

    Args:
        model: a transformers ViT.
        arch: its :class:`~reportgen.model.hf.HFArchitecture`.
    """

    def __init__(self, model: torch.nn.Module, arch: HFArchitecture):
        super().__init__()
        self._arch = arch
        self._norms: list[torch.Tensor | None] = [None] * len(arch.layers)

    def _install(self) -> None:
        for index, (name, layer) in enumerate(self._arch.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(index, name), with_kwargs=True))

    def _hook(self, index: int, name: str):
        def hook(_layer, args, kwargs):
            tokens = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
                raise CaptureError(f"{name} does not take [batch, tokens, channels] tokens, so their norms cannot be read")
            self._norms[index] = tokens.detach().float().norm(dim=-1).cpu()

        return hook

    def norms(self) -> torch.Tensor:
        """``[B, L, N]`` float32 norms of the last forward pass."""
        if any(n is None for n in self._norms):
            raise CaptureError("token norms were not captured from every layer")
        return torch.stack(self._norms, dim=1)
