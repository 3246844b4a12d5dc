"""Running the ViT over a batch and keeping, per image, only what the map methods need.

Each layer's full ``[B, H, N, N]`` attention exists only while that layer runs: the runner keeps
the query's row (the CLS token's, or the mean of the patch queries: see
:attr:`~reportgen.methods.base.TokenLayout.query`) of every layer and head when a method needs it, and hands the matrix to each
method's reducer (rollout advances one layer; attention keeps the last layer's head mean). At
518 px (1370 tokens) that is a few MB per image instead of a full stack of per-head matrices.

The model is reached only through its :class:`~reportgen.model.adapters.ModelAdapter`
(``loaded.adapter``), so the runner does not know which library it comes from.

Without a gradient method, the pass runs under ``torch.inference_mode``. With one (a method that
needs ``GRADIENTS`` or ``TOKEN_GRADIENTS``), the same single pass runs with autograd on, for
``GRADIENTS`` with fused attention switched off per module
(:class:`~reportgen.model.gradients.AttentionGradients`), for ``TOKEN_GRADIENTS`` with the
tokens each block's attention reads hooked (:class:`~reportgen.model.gradients.BlockGradients`); each image's targets
(:mod:`reportgen.model.targets`: one, or one per chosen class) are computed from the final tokens,
and for each target in turn ``torch.autograd.grad`` takes its gradient down to the first layer's
attention and/or first block's tokens, handing each layer's attention or block's tokens, with the
gradient, to fresh reducers of the gradient methods as it arrives. Parameters' ``.grad`` fields and
``requires_grad`` flags, the training flag and the RNG state are left as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import torch

from reportgen.methods.base import (
    ATTENTION_ROWS, GRADIENT_NEEDS, GRADIENTS, SERVED, TARGET, TOKEN_GRADIENTS, ForwardPass, MapMethod,
)
from reportgen.model.capture import CaptureInfo
from reportgen.model.loading import LoadedModel
from reportgen.model.targets import Targets


class ModelRunner:
    """Runs batches through a loaded ViT with attention capture, for the given methods.

    Args:
        loaded: the model and its metadata.
        methods: the map methods the results are for.
        chosen: the classes whose logits the gradient methods explain in every image (indices
            :meth:`~reportgen.model.targets.Targets.resolve` gave); empty for each image's ``top``
            predicted classes.
        top: how many of each image's top predicted classes to explain, without ``chosen``.
    """

    def __init__(self, loaded: LoadedModel, methods: Sequence[MapMethod], chosen: tuple[int, ...] = (), top: int = 1):
        for method in methods:
            unserved = method.needs - SERVED
            assert not unserved, f"{method.spec.name} needs {', '.join(sorted(unserved))}, which the runner does not provide"
        self.loaded = loaded
        self.methods = list(methods)
        self.capture_info: CaptureInfo | None = None
        self.gradients = any(GRADIENT_NEEDS & m.needs for m in self.methods)
        wanted = self.gradients or any(TARGET in m.needs for m in self.methods)
        self.targets = Targets(loaded.adapter, chosen, top) if wanted else None

    def run(self, batch: torch.Tensor, objects: Sequence[Sequence[tuple[str, np.ndarray]]] | None = None) -> list[ForwardPass]:
        """Forward ``[B, 3, H, W]`` preprocessed images; one :class:`ForwardPass` per image. With
        ``objects`` (per image, its objects' ``(label, [rows, cols] patch coverage)``), a gradient
        pass also explains each object, after the image's class or label-free targets."""
        adapter = self.loaded.adapter
        depth = adapter.depth
        rows: list[torch.Tensor | None] = [None] * depth
        want_rows = any(ATTENTION_ROWS in m.needs for m in self.methods)
        layout = self.loaded.layout
        graded = {m.spec.name for m in self.methods if GRADIENTS in m.needs}
        token_graded = {m.spec.name for m in self.methods if TOKEN_GRADIENTS in m.needs}
        on_attention = {m.spec.name: r for m in self.methods
                        if not GRADIENT_NEEDS & m.needs and (r := m.reducer(depth, layout)) is not None}
        # Each backward pass (one per target) folds its gradients into fresh reducers.
        on_gradient: dict = {}
        on_token_gradient: dict = {}

        def fresh_gradient_reducers() -> None:
            on_gradient.clear()
            on_token_gradient.clear()
            for method in self.methods:
                if method.spec.name in graded | token_graded:
                    bucket = on_gradient if method.spec.name in graded else on_token_gradient
                    bucket[method.spec.name] = method.reducer(depth, layout)

        def on_layer(index: int, attn: torch.Tensor) -> None:
            if want_rows:
                # query_row copies: a view (and .cpu() of a CPU tensor is the tensor itself)
                # would keep this layer's whole [B, H, N, N] matrix alive until the batch ends.
                rows[index] = layout.query_row(attn).cpu()
            for reducer in on_attention.values():
                reducer.update(index, attn)

        def on_grad(index: int, attn: torch.Tensor, grad: torch.Tensor) -> None:
            for reducer in on_gradient.values():
                reducer.update(index, attn, grad)

        def on_token_grad(index: int, tokens: torch.Tensor, grad: torch.Tensor) -> None:
            for reducer in on_token_gradient.values():
                reducer.update(index, tokens, grad)

        x = batch.to(self.loaded.device)
        targets = predictions = None
        kept_by_target: list[dict[str, dict[str, torch.Tensor]]] = []
        with ExitStack() as stack:
            # A build whose methods read no attention (Grad-CAM alone) computes none.
            listens = want_rows or bool(on_attention)
            capture = stack.enter_context(adapter.attention_capture(on_layer if listens else None))
            norms = stack.enter_context(adapter.token_norms())
            if not self.gradients:
                with torch.inference_mode():
                    capture.begin()
                    tokens = adapter.forward_features(x).float().cpu()
                    capture.check_complete()
            else:
                # Attention on the graph (fused attention off) only for methods that weight it.
                layers = stack.enter_context(adapter.attention_gradients(on_grad)) if graded else None
                blocks = stack.enter_context(adapter.block_gradients(on_token_grad)) if token_graded else None
                # A model in training mode would draw dropout masks; the caller's RNG stream is kept.
                stack.enter_context(torch.random.fork_rng(devices=_rng_devices(x.device)))
                with torch.enable_grad():
                    capture.begin()
                    for hooked in (layers, blocks):
                        if hooked is not None:
                            hooked.begin()
                    # The input on the graph: a model whose parameters are frozen still has one.
                    features = adapter.forward_features(x.detach().clone().requires_grad_(True))
                    capture.check_complete()
                    for hooked in (layers, blocks):
                        if hooked is not None:
                            hooked.check_complete()
                    tokens = features.detach().float().cpu()
                    scores, targets, predictions = self.targets.scores(features)  # [B, K]
                    if objects is not None:
                        object_scores, object_targets = self.targets.object_scores(features, objects, layout.num_prefix_tokens)
                        scores = torch.cat([scores, object_scores.to(scores.dtype)], dim=1)
                        targets = [own + theirs for own, theirs in zip(targets, object_targets)]
                    # Gradients down to the first layer's attention and the first block's
                    # tokens only: no parameter's .grad is touched and nothing below the first
                    # block is differentiated. One backward pass per target; the graph is kept
                    # for the next.
                    firsts = [hooked.first() for hooked in (layers, blocks) if hooked is not None]
                    for k in range(scores.shape[1]):
                        fresh_gradient_reducers()
                        torch.autograd.grad(scores[:, k].sum(), firsts, retain_graph=k + 1 < scores.shape[1])
                        kept_by_target.append(
                            {name: r.kept() for name, r in (on_gradient | on_token_gradient).items()})
            token_norms = norms.norms()  # [B, L, N]
        self.capture_info = capture.info
        query_rows = torch.stack(rows, dim=1) if want_rows else None  # [B, L, H, N]
        kept = {name: reducer.kept() for name, reducer in on_attention.items()}
        if kept_by_target:
            kept.update(kept_by_target[0])

        def of_image(arrays: dict[str, dict[str, torch.Tensor]], b: int) -> dict[str, dict[str, torch.Tensor]]:
            return {name: {key: value[b] for key, value in by_key.items()} for name, by_key in arrays.items()}

        return [
            ForwardPass(
                tokens=tokens[b],
                token_norms=token_norms[b],
                query_rows=query_rows[b] if query_rows is not None else None,
                kept=of_image(kept, b),
                target=targets[b][0] if targets is not None else None,
                predictions=predictions[b] if predictions is not None else None,
                # An image with fewer objects than the batch's most has no maps for the rest.
                other_targets=tuple(
                    (targets[b][k], of_image(kept_by_target[k], b)) for k in range(1, len(targets[b]))
                ) if targets is not None else (),
            )
            for b in range(batch.shape[0])
        ]


def _rng_devices(device: torch.device) -> list:
    """The accelerator devices whose RNG state ``fork_rng`` must save (the CPU's always is)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
