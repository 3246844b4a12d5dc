"""What a gradient method explains: one scalar per image, computed on the autograd graph.

- A model with a classifier head (``num_classes > 0``): the logit of its top-1 predicted class.
  Class names come from timm's ``ImageNetInfo`` for the ImageNet label sets timm recognises by the
  number of classes (1000 for ImageNet-1k); otherwise a class is named by its index.
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

TOP_PREDICTIONS = 5

LABEL_FREE = (
    "the label-free target (Crabbe & van der Schaar 2022): the inner product of the pooled image "
    "embedding with a detached copy of itself"
)


class Targets:
    """The targets of a model's images.

    Args:
        model: a timm ViT (``forward_head`` and ``num_classes`` as timm's VisionTransformer).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.classifier = int(getattr(model, "num_classes", 0) or 0) > 0
        self._names = _class_names(model) if self.classifier else None

    def name(self, index: int) -> str | None:
        """The name of class ``index``, or None when the model's classes have none."""
        return self._names(index) if self._names is not None else None

    def scores(self, features: torch.Tensor) -> tuple[torch.Tensor, list[Target], list[tuple[Prediction, ...]] | None]:
        """From ``[B, N, C]`` final tokens on the graph: ``[B]`` target values (on the graph),
        each image's :class:`Target` and, for a classifier, its top predictions."""
        if not self.classifier:
            embedding = self.model.forward_head(features, pre_logits=True)
            score = (embedding * embedding.detach()).sum(dim=-1)
            return score, [Target("label-free", LABEL_FREE, float(s)) for s in score.detach().cpu()], None
        logits = self.model.forward_head(features)
        top1 = logits.detach().argmax(dim=-1)
        score = logits.gather(1, top1[:, None])[:, 0]
        values = score.detach().cpu()
        probs = logits.detach().float().softmax(dim=-1).cpu()
        best = probs.topk(min(TOP_PREDICTIONS, probs.shape[-1]), dim=-1)
        targets, predictions = [], []
        for b, index in enumerate(top1.tolist()):
            name = self.name(index)
            named = f"class {index} ({name})" if name else f"class {index}"
            targets.append(Target("class", f"the logit of {named}, the top-1 prediction", float(values[b]), index, name))
            predictions.append(
                tuple(Prediction(int(i), self.name(int(i)), float(p)) for p, i in zip(best.values[b], best.indices[b]))
            )
        return score, targets, predictions


def _class_names(model: torch.nn.Module):
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return info.index_to_description
