"""The one interface through which reportgen reaches a Vision Transformer.

The runner (:mod:`reportgen.model.runner`), the targets (:mod:`reportgen.model.targets`) and the
report read a model only through a :class:`ModelAdapter`, so the map methods, the experiments and
the site do not know which library the model came from. :func:`reportgen.model.loading.load_model`
puts the adapter on :attr:`~reportgen.model.loading.LoadedModel.adapter`.

What an adapter must provide (every abstract member of :class:`ModelAdapter`):

- Structure: :attr:`~ModelAdapter.layer_names` (one name per attention layer, first layer first),
  :attr:`~ModelAdapter.heads`, and the token layout: :attr:`~ModelAdapter.num_prefix_tokens`,
  :attr:`~ModelAdapter.prefix_kinds`, :attr:`~ModelAdapter.class_token`, the patch
  :attr:`~ModelAdapter.grid`, :attr:`~ModelAdapter.patch_size` and the
  :attr:`~ModelAdapter.input_size` the model is built for (the preprocessing geometry). Tokens are
  always ordered ``[prefix tokens..., patch tokens row by row]``, ``N = prefix + rows * cols``.
- Four context managers, each with hooks that live only inside its ``with`` block and leave the
  model exactly as found on exit, also on error (per-instance switches restored, global switches
  never touched):

  * :meth:`~ModelAdapter.attention_capture` -> :class:`LayerCapture`: calls
    ``on_layer(index, attn)`` (unless ``on_layer`` is None: nothing reads the attention, and the
    capture only checks that every layer ran) during the forward pass with each layer's attention probabilities,
    float32 ``[B, H, N, N]``, detached, rows summing to 1, computed with the family's own maths
    (rotary embedding, position bias ...);
  * :meth:`~ModelAdapter.token_norms` -> :class:`NormCapture`: ``[B, L, N]`` norms of the tokens
    entering each layer's block;
  * :meth:`~ModelAdapter.attention_gradients` -> :class:`GradientCapture`: each layer's attention
    on the autograd graph; ``on_gradient(index, attn, grad)`` as the backward pass reaches it;
  * :meth:`~ModelAdapter.block_gradients` -> :class:`GradientCapture`: the ``[B, N, C]`` tokens
    each layer's attention reads, on the graph, with their gradient.

- The forward pass: :meth:`~ModelAdapter.forward_features` (pixels -> final ``[B, N, C]`` tokens,
  on the graph when grad mode is on) and :meth:`~ModelAdapter.forward_head` (those tokens ->
  logits, or the pooled embedding with ``pre_logits=True``), :attr:`~ModelAdapter.num_classes`
  (0 for a headless backbone) and :meth:`~ModelAdapter.class_names`.
- For the sanity check (optional): :meth:`~ModelAdapter.blocks`, the transformer blocks it
  re-initialises, first first (none by default: the check is then left out).

The runner enters the capture contexts, calls ``begin()``, runs :meth:`forward_features` once,
then ``check_complete()``, which must raise :class:`~reportgen.errors.CaptureError` if any layer
was missed; for a gradient pass it differentiates down to ``first()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch

from reportgen.errors import CaptureError
from reportgen.model.capture import AttentionCapture, CaptureInfo, LayerCallback, attention_modules
from reportgen.model.gradients import AttentionGradients, BlockGradients, GradientCallback
from reportgen.model.norms import TokenNormCapture


class LayerCapture(Protocol):
    """A context manager handing each layer's attention to ``on_layer`` (see the module doc)."""

    info: CaptureInfo  # how attention was obtained, for the report

    def __enter__(self) -> LayerCapture: ...

    def __exit__(self, *exc) -> None: ...

    def begin(self) -> None:
        """Start a new forward pass: forget which layers were seen."""

    def check_complete(self) -> None:
        """Raise :class:`~reportgen.errors.CaptureError` unless every layer was captured."""


class NormCapture(Protocol):
    """A context manager recording the norms of the tokens entering each block."""

    def __enter__(self) -> NormCapture: ...

    def __exit__(self, *exc) -> None: ...

    def norms(self) -> torch.Tensor:
        """``[B, L, N]`` float32 norms of the last forward pass."""


class GradientCapture(Protocol):
    """A context manager keeping each layer's tensor (attention or tokens) on the autograd graph."""

    def __enter__(self) -> GradientCapture: ...

    def __exit__(self, *exc) -> None: ...

    def begin(self) -> None:
        """Start a new pass."""

    def check_complete(self) -> None:
        """Raise :class:`~reportgen.errors.CaptureError` unless every layer's tensor is on the graph."""

    def first(self) -> torch.Tensor:
        """The first layer's tensor: a backward pass down to it reaches every layer's."""


class ModelAdapter(ABC):
    """How reportgen reaches one library's Vision Transformer (see the module doc for the contract).

    Attributes:
        library: the library the model comes from (``timm``, ``transformers``), for the report.
        module: the model itself, in eval mode.
    """

    library: ClassVar[str]
    module: torch.nn.Module

    # Structure and token layout.
    @property
    @abstractmethod
    def layer_names(self) -> tuple[str, ...]:
        """A name per attention layer (its module's qualified name), first layer first."""

    @property
    def depth(self) -> int:
        return len(self.layer_names)

    @property
    @abstractmethod
    def heads(self) -> int | None:
        """Attention heads per layer."""

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class, distillation, registers)."""

    @property
    @abstractmethod
    def prefix_kinds(self) -> tuple[str, ...]:
        """What each prefix token is (``cls``, ``distillation``, ``register``, or ``prefix``), in
        token order; as many as :attr:`num_prefix_tokens`."""

    @property
    @abstractmethod
    def class_token(self) -> bool:
        """Whether the model's output is read from its class token (the first prefix token);
        False for a model that pools its patch tokens (mean, attention pooling)."""

    @property
    @abstractmethod
    def grid(self) -> tuple[int, int]:
        """Patch grid as (rows, cols)."""

    @property
    @abstractmethod
    def patch_size(self) -> tuple[int, int]:
        """Patch size as (h, w) pixels."""

    @property
    @abstractmethod
    def input_size(self) -> tuple[int, int]:
        """The (h, w) pixels the model is built for: ``grid * patch_size``."""

    # Capture contexts.
    @abstractmethod
    def attention_capture(self, on_layer: LayerCallback | None) -> LayerCapture:
        """Each layer's attention probabilities, detached, during the forward pass."""

    @abstractmethod
    def token_norms(self) -> NormCapture:
        """The norms of the tokens entering each layer's block."""

    @abstractmethod
    def attention_gradients(self, on_gradient: GradientCallback) -> GradientCapture:
        """Each layer's attention on the autograd graph, and its gradient."""

    @abstractmethod
    def block_gradients(self, on_gradient: GradientCallback) -> GradientCapture:
        """The tokens each layer's attention reads, on the graph, and their gradient."""

    # The forward pass and the head.
    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` preprocessed images -> ``[B, N, C]`` final (normalised) tokens."""

    @abstractmethod
    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``[B, N, C]`` final tokens -> ``[B, num_classes]`` logits, or with ``pre_logits`` the
        ``[B, D]`` pooled image embedding the classifier reads."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Classes of the classifier head; 0 for a headless backbone."""

    @abstractmethod
    def class_names(self) -> Callable[[int], str] | None:
        """A function from class index to name, or None when the classes have no names."""

    # The sanity check.
    def blocks(self) -> tuple[torch.nn.Module, ...]:
        """The model's transformer blocks (encoder layers), first first, each holding its own
        weights: what the cascading model-randomisation check (:mod:`reportgen.model.sanity`)
        re-initialises. Empty for a model whose blocks reportgen cannot re-initialise."""
        return ()


class TimmAdapter(ModelAdapter):
    """A timm Vision Transformer (``VisionTransformer``, ``Eva``, ``Beit``,
    ``VisionTransformerRelPos``): patch embedding with a fixed grid, prefix tokens first, and
    attention modules :mod:`reportgen.model.capture` knows how to read.

    Args:
        model: the timm model.

    Raises:
        CaptureError: the model has no attention modules reportgen can read.
    """

    library = "timm"

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self._layers = tuple(name for name, _ in attention_modules(model))

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self._layers

    @property
    def heads(self) -> int | None:
        return getattr(self.module.get_submodule(self._layers[0]), "num_heads", None)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.module, "num_prefix_tokens", 0))

    @property
    def prefix_kinds(self) -> tuple[str, ...]:
        model = self.module
        kinds = ["cls"] if getattr(model, "cls_token", None) is not None else []
        if getattr(model, "dist_token", None) is not None:
            kinds.append("distillation")
        # VisionTransformer counts its registers in num_reg_tokens, Eva keeps them in reg_token.
        registers = getattr(model, "num_reg_tokens", None)
        if registers is None and getattr(model, "reg_token", None) is not None:
            registers = model.reg_token.shape[1]
        kinds += ["register"] * int(registers or 0)
        return tuple(kinds) if len(kinds) == self.num_prefix_tokens else ("prefix",) * self.num_prefix_tokens

    @property
    def class_token(self) -> bool:
        # timm's global_pool: "token" reads the class token; "avg", "max", "avgmax" pool the
        # patches, "map" (SigLIP) is an attention pool.
        model = self.module
        return getattr(model, "cls_token", None) is not None and getattr(model, "global_pool", "token") not in (
            "avg", "max", "avgmax", "map",
        )

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(int(g) for g in self.module.patch_embed.grid_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(p) for p in self.module.patch_embed.patch_size)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.module.patch_embed.img_size)

    def attention_capture(self, on_layer: LayerCallback | None) -> AttentionCapture:
        return AttentionCapture(self.module, on_layer)

    def token_norms(self) -> TokenNormCapture:
        return TokenNormCapture(self.module, self._layers)

    def attention_gradients(self, on_gradient: GradientCallback) -> AttentionGradients:
        return AttentionGradients(self.module, on_gradient)

    def block_gradients(self, on_gradient: GradientCallback) -> BlockGradients:
        return BlockGradients(self.module, self._layers, on_gradient)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward_features(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.module.forward_head(features, pre_logits=pre_logits)

    @property
    def num_classes(self) -> int:
        return int(getattr(self.module, "num_classes", 0) or 0)

    def class_names(self) -> Callable[[int], str] | None:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(self.module)
        return ImageNetInfo(subset).index_to_description if subset is not None else None

    def blocks(self) -> tuple[torch.nn.Module, ...]:
        return tuple(getattr(self.module, "blocks", ()))


def adapter_for(model: torch.nn.Module | ModelAdapter) -> ModelAdapter:
    """``model`` itself if it is an adapter, else the :class:`TimmAdapter` of a timm model."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"{type(model).__name__} is neither a ModelAdapter nor a torch module")
    return TimmAdapter(model)
