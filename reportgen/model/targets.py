"""What a gradient method explains: one scalar per image, computed on the autograd graph.

- A model with a classifier head (``num_classes > 0``): the logit of each of its top-k predicted
  classes (top-1 by default), or of classes chosen for every image (:meth:`Targets.resolve` finds
  them by index or name); one target, and so one set of maps, per class.
  Class names come from the model's adapter (for timm models, timm's ``ImageNetInfo`` for the
  ImageNet label sets timm recognises by the number of classes, 1000 for ImageNet-1k); otherwise
  a class is named by its index.
- A headless backbone (``num_classes == 0``): the label-free target of Crabbe & van der Schaar
  (ICML 2022, "Label-Free Explainability for Unsupervised Models"), the inner product of the
  pooled image embedding with a detached copy of itself, whose gradient says which inputs make up
  the representation.
- An object (``attention.object_targets``, any model): the cosine similarity of the pooled image
  embedding with the object's embedding of experiment 3 (the final patch tokens averaged with the
  box's patch coverage as weights), held fixed: which patches make the image look like the object.

Each image's target depends on that image alone, so the sum over a batch of target ``k`` has, for
each image, the gradient of its own ``k``-th target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from reportgen.errors import CaptureError
from reportgen.methods.base import Prediction, Target
from reportgen.model.adapters import ModelAdapter, adapter_for

TOP_PREDICTIONS = 5

LABEL_FREE = (
    "the label-free target (Crabbe & van der Schaar 2022): the inner product of the pooled image "
    "embedding with a detached copy of itself"
)


NO_HEAD = (
    "the model has no classifier head (num_classes = 0), so its gradient maps explain the label-free "
    "target; leave the classes out"
)

OBJECT = (
    "the cosine similarity of the pooled image embedding with the embedding of the object {label!r} "
    "(its final patch tokens averaged with the box's patch coverage as weights, held fixed)"
)


class Targets:
    """The targets of a model's images.

    Args:
        model: the model's adapter (a timm model is wrapped in its
            :class:`~reportgen.model.adapters.TimmAdapter`).
        chosen: the classes every image's targets are the logits of (indices from
            :meth:`resolve`), in order; empty for each image's ``top`` predicted classes.
        top: how many of each image's top predicted classes to explain, without ``chosen``.
    """

    def __init__(self, model: ModelAdapter | torch.nn.Module, chosen: tuple[int, ...] = (), top: int = 1):
        self.adapter = adapter_for(model)
        self.num_classes = self.adapter.num_classes
        self.classifier = self.num_classes > 0
        self._names = self.adapter.class_names() if self.classifier else None
        assert all(0 <= c < self.num_classes for c in chosen), chosen
        assert chosen or 1 <= top <= max(self.num_classes, 1), top
        self.chosen = tuple(chosen)
        self.top = top

    @property
    def count(self) -> int:
        """How many targets each image has."""
        return len(self.chosen) or (self.top if self.classifier else 1)

    def resolve(self, choice: int | str) -> int:
        """The index of the class ``choice`` (an index, or a name: the class's full name or one of
        its comma-separated synonyms, in any case).

        Raises:
            ValueError: saying why the model has no such class, in one sentence.
        """
        if not self.classifier:
            raise ValueError(NO_HEAD)
        if isinstance(choice, int):
            if choice >= self.num_classes:
                raise ValueError(f"the model has {self.num_classes} classes, 0 to {self.num_classes - 1}")
            return choice
        if self._names is None:
            raise ValueError(f"the model's {self.num_classes} classes have no names; give an index from 0 to {self.num_classes - 1}")
        wanted = choice.strip().casefold()
        found = [
            index for index in range(self.num_classes)
            if wanted == self.name(index).casefold()
            or wanted in (synonym.strip().casefold() for synonym in self.name(index).split(","))
        ]
        if not found:
            raise ValueError(
                "no class of the model has that name; give its index, or a name as the model's classes spell it "
                "(timm's ImageNetInfo for ImageNet classifiers, config.id2label for transformers models)"
            )
        if len(found) > 1:
            named = "; ".join(f"{index} ({self.name(index)})" for index in found)
            raise ValueError(f"the name fits {len(found)} classes, {named}; give the index")
        return found[0]

    def name(self, index: int) -> str | None:
        """The name of class ``index``, or None when the model's classes have none."""
        return self._names(index) if self._names is not None else None

    def scores(
        self, features: torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[Target, ...]], list[tuple[Prediction, ...]] | None]:
        """From ``[B, N, C]`` final tokens on the graph: ``[B, K]`` target values (on the graph;
        K = :attr:`count`), each image's K :class:`Target` and, for a classifier, its top predictions."""
        if not self.classifier:
            embedding = self.adapter.forward_head(features, pre_logits=True)
            score = (embedding * embedding.detach()).sum(dim=-1)
            return score[:, None], [(Target("label-free", LABEL_FREE, float(s)),) for s in score.detach().cpu()], None
        logits = self.adapter.forward_head(features)
        # One stable ranking for the top-k targets and the predictions: ties go to the lower
        # index, so a batch and single images agree.
        ranked = torch.sort(logits.detach().float().cpu(), dim=-1, descending=True, stable=True).indices
        if self.chosen:
            explained = torch.tensor(self.chosen, device=logits.device).expand(logits.shape[0], -1)
        else:
            explained = ranked[:, : self.top].to(logits.device)
        score = logits.gather(1, explained)  # [B, K]
        values = score.detach().float().cpu()
        probs = logits.detach().float().softmax(dim=-1).cpu()
        targets, predictions = [], []
        for b, indices in enumerate(explained.tolist()):
            targets.append(tuple(
                Target("class", f"the logit of {self._named(index)}, {self._why(k)}", float(values[b, k]), index,
                       self.name(index), reason=self._why(k))
                for k, index in enumerate(indices)
            ))
            best = ranked[b, :TOP_PREDICTIONS].tolist()
            predictions.append(tuple(Prediction(i, self.name(i), float(probs[b, i])) for i in best))
        return score, targets, predictions

    def object_scores(
        self, features: torch.Tensor, objects: Sequence[Sequence[tuple[str, np.ndarray]]], num_prefix_tokens: int
    ) -> tuple[torch.Tensor, list[tuple[Target, ...]]]:
        """From ``[B, N, C]`` final tokens on the graph and, per image, its objects' ``(label,
        [rows, cols] patch coverage)``: ``[B, J]`` cosine similarities on the graph (J the most
        objects of an image; 0, with no gradient, past an image's last object) and each image's
        object :class:`Target` s."""
        embedding = self.adapter.forward_head(features, pre_logits=True)  # [B, D]
        patches = features[:, num_prefix_tokens:].detach()  # [B, P, C]: the objects are held fixed
        check_object_width(embedding.shape[-1], patches.shape[-1])
        count = max((len(image) for image in objects), default=0)
        weights = torch.zeros(len(objects), count, patches.shape[1], dtype=patches.dtype)
        for b, image in enumerate(objects):
            for j, (_label, coverage) in enumerate(image):
                weights[b, j] = coverage_weights(coverage)
        pooled = weights.to(patches.device) @ patches  # [B, J, C]
        score = torch.nn.functional.cosine_similarity(embedding[:, None, :], pooled, dim=-1)  # [B, J]
        values = score.detach().float().cpu()
        targets = [
            tuple(Target("object", OBJECT.format(label=label), float(values[b, j]), object_label=label)
                  for j, (label, _coverage) in enumerate(image))
            for b, image in enumerate(objects)
        ]
        return score, targets

    def _named(self, index: int) -> str:
        name = self.name(index)
        return f"class {index} ({name})" if name else f"class {index}"

    def _why(self, k: int) -> str:
        """Why the ``k``-th target (from 0) was explained, in words."""
        if self.chosen:
            return "a class chosen (attention.target_classes)"
        return "the top-1 prediction" if k == 0 else f"the top-{k + 1} prediction"


def coverage_weights(coverage: np.ndarray) -> torch.Tensor:
    """An object's weight on each patch in its embedding (float64, ``[P]``): the box's patch
    coverage, summing to 1. The object target and its evaluation pool the final patch tokens
    with these weights."""
    return torch.from_numpy(np.ravel(coverage) / np.sum(coverage))


def check_object_width(embedding_width: int, token_width: int) -> None:
    """Raise :class:`CaptureError` unless the image embedding and the patch tokens, whose
    averages the object targets compare it with, have the same width."""
    if embedding_width != token_width:
        raise CaptureError(
            f"object targets compare the image embedding with token averages, but the model's embedding has "
            f"{embedding_width} features and its tokens {token_width}"
        )
