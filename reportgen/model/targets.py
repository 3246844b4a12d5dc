"""What a gradient method explains: one scalar per image, computed on the autograd graph.

- A model with a classifier head (``num_classes > 0``): the logit of its top-1 predicted class, or
  of one class chosen for every image (:meth:`Targets.resolve` finds it by index or name).
  Class names come from the model's adapter (for timm models, timm's ``ImageNetInfo`` for the
  ImageNet label sets timm recognises by the number of classes, 1000 for ImageNet-1k); otherwise
  a class is named by its index.
- A headless backbone (``num_classes == 0``): the label-free target of Crabbe & van der Schaar
  (ICML 2022, "Label-Free Explainability for Unsupervised Models"), the inner product of the
  pooled image embedding with a detached copy of itself, whose gradient says which inputs make up
  the representation.

Each image's target depends on that image alone, so the sum over a batch has, for each image, the
gradient of its own target.
"""

from __future__ import annotations

import torch

from reportgen.methods.base import Prediction, Target
from reportgen.model.adapters import ModelAdapter, adapter_for

TOP_PREDICTIONS = 5

LABEL_FREE = (
    "the label-free target (Crabbe & van der Schaar 2022): the inner product of the pooled image "
    "embedding with a detached copy of itself"
)


class Targets:
    """The targets of a model's images.

    Args:
        model: the model's adapter (a timm model is wrapped in its
            :class:`~reportgen.model.adapters.TimmAdapter`).
        chosen: the class every image's target is the logit of (from :meth:`resolve`); None for
            each image's top-1 class.
    """

    def __init__(self, model: ModelAdapter | torch.nn.Module, chosen: int | None = None):
        self.adapter = adapter_for(model)
        self.num_classes = self.adapter.num_classes
        self.classifier = self.num_classes > 0
        self._names = self.adapter.class_names() if self.classifier else None
        assert chosen is None or 0 <= chosen < self.num_classes, chosen
        self.chosen = chosen

    def resolve(self, choice: int | str) -> int:
        """The index of the class ``choice`` (an index, or a name: the class's full name or one of
        its comma-separated synonyms, in any case).

        Raises:
            ValueError: saying why the model has no such class, in one sentence.
        """
        if not self.classifier:
            raise ValueError(
                "the model has no classifier head (num_classes = 0), so its gradient maps explain the "
                "label-free target; leave the class out"
            )
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
            raise ValueError((
                "no class of the model has that name; give its index, or a name as the model's classes spell it "
                "(timm's ImageNetInfo for ImageNet classifiers, config.id2label for transformers models)"
            ))
        if len(found) > 1:
            named = "; ".join(f"{index} ({self.name(index)})" for index in found)
            raise ValueError(f"the name fits {len(found)} classes, {named}; give the index")
        return found[0]

    def name(self, index: int) -> str | None:
        """The name of class ``index``, or None when the model's classes have none."""
        return self._names(index) if self._names is not None else None

    def scores(self, features: torch.Tensor) -> tuple[torch.Tensor, list[Target], list[tuple[Prediction, ...]] | None]:
        """From ``[B, N, C]`` final tokens on the graph: ``[B]`` target values (on the graph),
        each image's :class:`Target` and, for a classifier, its top predictions."""
        if not self.classifier:
            embedding = self.adapter.forward_head(features, pre_logits=True)
            score = (embedding * embedding.detach()).sum(dim=-1)
            return score, [Target("label-free", LABEL_FREE, float(s)) for s in score.detach().cpu()], None
        logits = self.adapter.forward_head(features)
        top1 = logits.detach().argmax(dim=-1)
        explained = top1 if self.chosen is None else torch.full_like(top1, self.chosen)
        score = logits.gather(1, explained[:, None])[:, 0]
        values = score.detach().cpu()
        probs = logits.detach().float().softmax(dim=-1).cpu()
        best = probs.topk(min(TOP_PREDICTIONS, probs.shape[-1]), dim=-1)
        targets, predictions = [], []
        for b, index in enumerate(explained.tolist()):
            name = self.name(index)
            named = f"class {index} ({name})" if name else f"class {index}"
            why = "the top-1 prediction" if self.chosen is None else "the class chosen (attention.target_class)"
            targets.append(Target("class", f"the logit of {named}, {why}", float(values[b]), index, name))
            predictions.append(
                tuple(Prediction(int(i), self.name(int(i)), float(p)) for p, i in zip(best.values[b], best.indices[b]))
            )
        return score, targets, predictions
