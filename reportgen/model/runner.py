"""Running the ViT over a batch and keeping, per image, only what the map methods need.

Each layer's full ``[B, H, N, N]`` attention exists only while that layer runs: the runner keeps
the query's row (the CLS token's, or the mean of the patch queries: see
:attr:`~reportgen.methods.base.TokenLayout.query`) of every layer and head when a method needs it, and hands the matrix to each
method's reducer (rollout advances one layer; attention keeps the last layer's head mean). At
518 px (1370 tokens) that is a few MB per image instead of a full stack of per-head matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reportgen.methods.base import ATTENTION_ROWS, SERVED, ForwardPass, MapMethod
from reportgen.model.capture import AttentionCapture, CaptureInfo, attention_modules
from reportgen.model.loading import LoadedModel
from reportgen.model.norms import TokenNormCapture


class ModelRunner:
    """Runs batches through a loaded ViT with attention capture, for the given methods.

    Args:
        loaded: the model and its metadata.
        methods: the map methods the results are for.
    """

    def __init__(self, loaded: LoadedModel, methods: Sequence[MapMethod]):
        for method in methods:
            unserved = method.needs - SERVED
            assert not unserved, f"{method.spec.name} needs {', '.join(sorted(unserved))}, which the runner does not provide"
        self.loaded = loaded
        self.methods = list(methods)
        self.capture_info: CaptureInfo | None = None

    def run(self, batch: torch.Tensor) -> list[ForwardPass]:
        """Forward ``[B, 3, H, W]`` preprocessed images; one :class:`ForwardPass` per image."""
        model = self.loaded.model
        depth = len(attention_modules(model))
        rows: list[torch.Tensor | None] = [None] * depth
        want_rows = any(ATTENTION_ROWS in m.needs for m in self.methods)
        layout = self.loaded.layout
        reducers = {m.spec.name: r for m in self.methods if (r := m.reducer(depth, layout)) is not None}

        def on_layer(index: int, attn: torch.Tensor) -> None:
            if want_rows:
                # query_row copies: a view (and .cpu() of a CPU tensor is the tensor itself)
                # would keep this layer's whole [B, H, N, N] matrix alive until the batch ends.
                rows[index] = layout.query_row(attn).cpu()
            for reducer in reducers.values():
                reducer.update(index, attn)

        with AttentionCapture(model, on_layer) as capture, TokenNormCapture(model, capture.info.layers) as norms:
            with torch.inference_mode():
                capture.begin()
                tokens = model.forward_features(batch.to(self.loaded.device)).float().cpu()
                capture.check_complete()
                token_norms = norms.norms()  # [B, L, N]
        self.capture_info = capture.info
        query_rows = torch.stack(rows, dim=1) if want_rows else None  # [B, L, H, N]
        kept = {name: reducer.kept() for name, reducer in reducers.items()}
        return [
            ForwardPass(
                tokens=tokens[b],
                token_norms=token_norms[b],
                query_rows=query_rows[b] if query_rows is not None else None,
                kept={name: {key: value[b] for key, value in arrays.items()} for name, arrays in kept.items()},
            )
            for b in range(batch.shape[0])
        ]
