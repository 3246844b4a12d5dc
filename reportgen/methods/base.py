"""The contract between the model stage and a map method.

A method says what it needs from the forward pass (:data:`ATTENTION_ROWS`, :data:`FULL_ATTENTION`,
:data:`GRADIENTS`, :data:`TOKEN_GRADIENTS`, :data:`TARGET`). For ``FULL_ATTENTION`` it gives the runner a
:class:`LayerReducer`, which sees each layer's ``[B, H, N, N]`` attention while that layer runs and
keeps only what the method needs, so memory does not grow with depth. For ``GRADIENTS`` it gives a
:class:`GradientReducer` instead, which sees each layer's attention with the gradient of the
image's :class:`Target` with respect to it, as that gradient arrives (last layer first); for
``TOKEN_GRADIENTS`` a :class:`TokenGradientReducer`, which sees the tokens each block's attention
reads (its attention module's input: the output of ``norm1`` in a pre-norm block) and their
gradient the same way. After the pass, :meth:`MapMethod.maps` turns one image's :class:`ForwardPass` into :class:`MethodMaps`
over the patch grid. Methods are pure maths: no hooks, files or figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from reportgen.methods import CLS_QUERY, PATCH_MEAN_QUERY, MethodSpec, Query

ATTENTION_ROWS = "attention rows"  # the query's row of every layer and head: [L, H, N]
FULL_ATTENTION = "full attention"  # every layer's [B, H, N, N], seen by the method's reducer
GRADIENTS = "gradients"  # gradients of a target with respect to each layer's attention
TOKEN_GRADIENTS = "token gradients"  # each block's normalised input tokens and the target's gradient
TARGET = "target"  # a class, a label-free score or an object to explain

#: The needs the model runner can serve.
SERVED = frozenset({ATTENTION_ROWS, FULL_ATTENTION, GRADIENTS, TOKEN_GRADIENTS, TARGET})

#: The needs that make the runner take a gradient pass.
GRADIENT_NEEDS = frozenset({GRADIENTS, TOKEN_GRADIENTS})


@dataclass(frozen=True)
class Prediction:
    """One of a classifier's top predictions for an image.

    Attributes:
        index: the class index.
        name: the class's name (ImageNet's for ImageNet classifiers), None when the model has none.
        probability: its softmax probability over all classes.
    """

    index: int
    name: str | None
    probability: float


@dataclass(frozen=True)
class Target:
    """The scalar a gradient method explains, for one image.

    Attributes:
        kind: ``class`` (a classifier's logit), ``label-free`` (a headless model's embedding) or
            ``object`` (the image embedding's cosine similarity with an object's).
        description: what it is, in words ("the logit of class 281, tabby, tabby cat, ...").
        score: its value for this image.
        class_index: the class whose logit it is (``class`` only).
        class_name: that class's name, None when the model has none.
        object_label: the object's label (``object`` only).
        reason: why this class was explained (``the top-2 prediction``, ``a class chosen
            (attention.target_classes)``; ``class`` only).
    """

    kind: str
    description: str
    score: float
    class_index: int | None = None
    class_name: str | None = None
    object_label: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class TokenLayout:
    """How the model's tokens map onto the input, and which query the maps are read for.

    Attributes:
        num_prefix_tokens: CLS (+ distillation, registers) before the patches.
        grid: patch grid (rows, cols).
        patch_size: patch (h, w) in input pixels.
        class_token: whether the first prefix token is a class token; None means "if there are
            prefix tokens" (timm puts the class token first). False with prefix tokens is a model
            with registers but global average pooling.
        prefix_kinds: what each prefix token is (``cls``, ``distillation``, ``register``, or
            ``prefix`` when the model does not say), in token order.
    """

    num_prefix_tokens: int
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    class_token: bool | None = None
    prefix_kinds: tuple[str, ...] = ()

    @property
    def query(self) -> Query:
        """The query whose row every map shows: the CLS token's, else (a model that pools the mean
        of its patch tokens) the mean of the patch tokens' rows."""
        has_class_token = self.num_prefix_tokens > 0 if self.class_token is None else self.class_token
        return CLS_QUERY if has_class_token else PATCH_MEAN_QUERY

    def query_row(self, matrix: torch.Tensor) -> torch.Tensor:
        """``[..., N, N]`` attention or rollout (rows are queries) -> ``[..., N]``, the query's row.

        The mean of rows that each sum to 1 also sums to 1, so both queries give a distribution
        over all N tokens. The result never shares memory with ``matrix``.
        """
        if self.query is CLS_QUERY:
            return matrix[..., 0, :].clone()
        return matrix[..., self.num_prefix_tokens :, :].mean(dim=-2)

    def kinds(self) -> tuple[str, ...]:
        """``prefix_kinds``, or ``prefix`` for each prefix token when they are not known."""
        known = len(self.prefix_kinds) == self.num_prefix_tokens
        return self.prefix_kinds if known else ("prefix",) * self.num_prefix_tokens

    def to_grid(self, values: torch.Tensor) -> np.ndarray:
        """``[..., N]`` token values -> float64 ``[..., rows, cols]`` over the patches (prefix dropped)."""
        patches = values[..., self.num_prefix_tokens :]
        return patches.reshape(*patches.shape[:-1], *self.grid).double().numpy()


@dataclass(frozen=True)
class ForwardPass:
    """What one forward pass gave for one image, as the methods asked for it (float32 CPU tensors).

    Attributes:
        tokens: ``[N, C]`` final-layer tokens after the final norm.
        token_norms: ``[L, N]`` L2 norm of every token entering each block (None when not
            captured).
        query_rows: ``[L, H, N]`` the query's row (:attr:`TokenLayout.query`) of every layer's
            attention per head (each sums to 1 over all tokens), or None when no method needs them.
        kept: per method name, what its :class:`LayerReducer` or :class:`GradientReducer` kept
            for this image.
        target: what the gradients are of (None when no method needs ``GRADIENTS``): the image's
            first target.
        predictions: a classifier's top-5 predictions (None for a headless model, or when no
            method needs ``TARGET``).
        other_targets: the image's further targets (``attention.target_classes``), each with
            what the gradient methods' reducers kept for it (as ``kept``).
    """

    tokens: torch.Tensor
    token_norms: torch.Tensor | None = None
    query_rows: torch.Tensor | None = None
    kept: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    target: Target | None = None
    predictions: tuple[Prediction, ...] | None = None
    other_targets: tuple[tuple[Target, dict[str, dict[str, torch.Tensor]]], ...] = ()


@dataclass(frozen=True)
class MethodMaps:
    """One method's result for one image.

    Attributes:
        maps: per map name (as in the method's spec), float64 ``[rows, cols]`` over the patches.
        layers: float64 ``[L, K, rows, cols]``: the method's K explorer columns at every layer.
        extras: further arrays the method's own experiment reads (e.g. per-head maps).
        provenance: how the maps were made, in one sentence.
        prefix: per map name, float64 ``[num_prefix_tokens]``: the map's values on the prefix
            tokens, for maps that are rows over all tokens (attention, rollout); absent otherwise.
        target: what the maps explain (methods that need ``TARGET``), else None.
        targets: per map name, what it explains, when the maps explain several targets (see
            :func:`~reportgen.methods.method_maps`); empty otherwise (then every map explains
            ``target``).
    """

    maps: dict[str, np.ndarray]
    layers: np.ndarray
    extras: dict[str, np.ndarray]
    provenance: str
    prefix: dict[str, np.ndarray] = field(default_factory=dict)
    target: Target | None = None
    targets: dict[str, Target] = field(default_factory=dict)

    def target_of(self, map_name: str) -> Target | None:
        """What the map ``map_name`` explains (None for a method that explains no target)."""
        return self.targets.get(map_name, self.target)


class LayerReducer(Protocol):
    """Folds the layers' attention, one layer at a time, into what a method keeps."""

    def update(self, index: int, attn: torch.Tensor) -> None:
        """See layer ``index``'s ``[B, H, N, N]`` attention (valid only during this call)."""

    def kept(self) -> dict[str, torch.Tensor]:
        """What was kept, each ``[B, ...]`` on the CPU."""


class GradientReducer(Protocol):
    """Folds each layer's attention and its gradient into what a gradient method keeps. Gradients
    arrive in backward order (last layer first), so a method that multiplies through the layers
    in forward order keeps a small per-layer summary and multiplies in :meth:`kept`."""

    def update(self, index: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
        """See layer ``index``'s ``[B, H, N, N]`` attention and the gradient of each image's
        target with respect to it (both detached, valid only during this call)."""

    def kept(self) -> dict[str, torch.Tensor]:
        """What was kept, each ``[B, ...]`` on the CPU."""


class TokenGradientReducer(Protocol):
    """Folds the tokens each block's attention reads and their gradient into what a gradient
    method keeps. Gradients arrive in backward order (last block first)."""

    def update(self, index: int, tokens: torch.Tensor, grad: torch.Tensor) -> None:
        """See block ``index``'s ``[B, N, C]`` normalised input tokens and the gradient of each image's
        target with respect to them (both detached, valid only during this call)."""

    def kept(self) -> dict[str, torch.Tensor]:
        """What was kept, each ``[B, ...]`` on the CPU."""


class MapMethod(Protocol):
    """A map method (see the module docstring)."""

    spec: MethodSpec
    needs: frozenset[str]

    def reducer(self, depth: int, layout: TokenLayout) -> LayerReducer | GradientReducer | TokenGradientReducer | None:
        """A fresh reducer for one batch through ``depth`` layers of a model with token layout
        ``layout``: a :class:`GradientReducer` with ``GRADIENTS``, a :class:`TokenGradientReducer`
        with ``TOKEN_GRADIENTS``, a :class:`LayerReducer` with ``FULL_ATTENTION``, else None."""

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        """The method's maps for one image."""
