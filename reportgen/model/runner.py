"""Running the ViT over a batch and keeping, per image, only the attention the report needs.

Each layer's full ``[B, H, N, N]`` attention exists only while that layer runs: the recorder keeps
the CLS row of every layer and head, the rollout advanced one layer at a time, and the last layer's
head-mean token-to-token map. At 518 px (1370 tokens) that is a few MB per image instead of a
full stack of per-head matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reportgen.config import AttentionSettings
from reportgen.methods.maths import rollout_step
from reportgen.model.capture import AttentionCapture, CaptureInfo, attention_modules
from reportgen.model.loading import LoadedModel


@dataclass(frozen=True)
class AttentionMaps:
    """What the model produced for one image. float32 CPU tensors; ``N`` tokens incl. prefix.

    Attributes:
        cls_attention: ``[L, H, N]`` CLS row of each layer's attention, per head (rows of the full
            matrix, so each sums to 1 over all tokens).
        last_layer: ``[N, N]`` last layer's token-to-token attention, mean over heads.
        rollout_cls: ``[L, N]`` CLS row of the attention rollout through layers ``0..l``.
        tokens: ``[N, C]`` final-layer tokens after the final norm.
    """

    cls_attention: torch.Tensor
    last_layer: torch.Tensor
    rollout_cls: torch.Tensor
    tokens: torch.Tensor


class _Recorder:
    def __init__(self, depth: int, settings: AttentionSettings):
        self.depth = depth
        self.settings = settings
        self.cls: list[torch.Tensor | None] = [None] * depth
        self.rollout_cls: list[torch.Tensor | None] = [None] * depth
        self.last_layer: torch.Tensor | None = None
        self._joint: torch.Tensor | None = None

    def on_layer(self, index: int, attn: torch.Tensor) -> None:
        # Copies, not views: a view (and .cpu() of a CPU tensor is the tensor itself) would keep
        # this layer's whole [B, H, N, N] matrix alive until the batch ends.
        self.cls[index] = attn[:, :, 0, :].to("cpu", copy=True)
        self._joint = rollout_step(self._joint, attn, self.settings.head_fusion, self.settings.discard_ratio)
        self.rollout_cls[index] = self._joint[:, 0, :].to("cpu", copy=True)
        if index == self.depth - 1:
            self.last_layer = attn.mean(dim=1).cpu()


class ModelRunner:
    """Runs batches through a loaded ViT with attention capture.

    Args:
        loaded: the model and its metadata.
        settings: rollout head fusion and discard ratio.
    """

    def __init__(self, loaded: LoadedModel, settings: AttentionSettings):
        self.loaded = loaded
        self.settings = settings
        self.capture_info: CaptureInfo | None = None

    def run(self, batch: torch.Tensor) -> list[AttentionMaps]:
        """Forward ``[B, 3, H, W]`` preprocessed images; one :class:`AttentionMaps` per image."""
        model = self.loaded.model
        recorder = _Recorder(len(attention_modules(model)), self.settings)
        with AttentionCapture(model, recorder.on_layer) as capture:
            with torch.inference_mode():
                capture.begin()
                tokens = model.forward_features(batch.to(self.loaded.device)).float().cpu()
                capture.check_complete()
        self.capture_info = capture.info
        cls = torch.stack(recorder.cls, dim=1)  # [B, L, H, N]
        rollout_cls = torch.stack(recorder.rollout_cls, dim=1)  # [B, L, N]
        return [
            AttentionMaps(
                cls_attention=cls[b],
                last_layer=recorder.last_layer[b],
                rollout_cls=rollout_cls[b],
                tokens=tokens[b],
            )
            for b in range(batch.shape[0])
        ]
