"""The forward passes of the evaluation: each map's perturbation curves scored by the model.

For every image of a batch and every map, the perturbed inputs of the deletion, negative and
insertion curves (orders and step counts from :mod:`reportgen.methods.evaluation`), and those of
the seeded random orders, are made and scored in chunks of a fixed number of inputs, the images of
a batch together. A removed patch's pixels that hold image are replaced by the baseline (the
image's mean colour over the image, the image blurred, or black); the pixels of letterbox padding
are never changed, so padding neither hides nor leaks anything.

Each map is scored with what it explains, divided by its value on the unperturbed input. A
``{map}/target-k`` map (a further class of ``attention.target_classes``) is scored with the softmax
probability of its class; a ``{map}/object-j`` map with the cosine similarity of the pooled image
embedding with object ``j``'s embedding, the final patch tokens of the unperturbed input averaged
with the box's patch coverage as weights (held fixed, as the map's target holds it); every other
map (attention and rollout explain no target, and the gradient methods' first maps) with the
image's target: for a classifier, the softmax probability of the target class (the class the
gradient methods explain when they ran, else the class chosen with ``attention.target_classes``
(the first), else the top-1 class of the unperturbed input); for a headless model, the label-free
target of Crabbe & van der Schaar (2022), the inner product of the pooled embedding with that of
the unperturbed input (divided by its squared norm). One forward pass of a perturbed input gives
every target of its image, so further targets cost no forward pass; the random orders are scored
with each of them too. The insertion curves start from the image blurred with a
Gaussian of sigma 5 input pixels (RISE's substrate: 11-pixel kernel, sigma 5), taken over the
image only (a normalised convolution), so padding does not bleed into it.

Under ``torch.inference_mode``; the caller's RNG state is kept (a model in training mode would
draw dropout masks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from reportgen.methods.evaluation import (
    CURVE_KINDS,
    RANDOM_SEED,
    STEPS,
    Curves,
    ScoredTarget,
    content_patches,
    random_orders,
    removal_masks,
    removal_order,
    step_counts,
)
from reportgen.model.loading import LoadedModel
from reportgen.model.targets import Targets, check_object_width, coverage_weights

#: RISE's blur for the insertion substrate: an 11-pixel Gaussian kernel of sigma 5 (input pixels).
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

#: Perturbed inputs per forward pass.
CHUNK = 32


@dataclass(frozen=True)
class MapTarget:
    """What a map explains when it is not the image's target.

    Attributes:
        kind: ``class`` (a further class's probability) or ``object`` (the cosine similarity with
            an object's embedding).
        class_index: the class (``class`` only).
        object_label: the object's label (``object`` only).
        coverage: ``[rows, cols]`` each patch's fraction inside the object's box (``object`` only).
    """

    kind: str
    class_index: int | None = None
    object_label: str | None = None
    coverage: np.ndarray | None = None


@dataclass(frozen=True)
class Subject:
    """One image to evaluate.

    Attributes:
        tensor: ``[3, H, W]`` the preprocessed (normalised) model input.
        maps: per map name, ``[rows, cols]`` the map.
        content: ``[rows, cols]`` each patch's image fraction (0: padding).
        content_box: ``(x0, y0, x1, y1)`` the part of the input that is image, in input pixels.
        target_class: the image's target class, whose probability scores every map not in
            ``targets`` (a classifier), or None for the top-1 class of the unperturbed input
            (ignored for a headless model).
        targets: per map name, its own target, for the maps that explain another class or an object.
    """

    tensor: torch.Tensor
    maps: dict[str, np.ndarray]
    content: np.ndarray
    content_box: tuple[float, float, float, float]
    target_class: int | None = None
    targets: dict[str, MapTarget] = field(default_factory=dict)


#: Target kinds as codes, for scoring a chunk of inputs at once.
_CLASS, _LABEL_FREE_KIND, _OBJECT = 0, 1, 2


@dataclass(frozen=True)
class _Aim:
    """One target of one image, resolved against the unperturbed input."""

    kind: str
    description: str
    label: str
    class_index: int | None = None
    object_label: str | None = None
    reference: torch.Tensor | None = None  # [D] the embedding a label-free or object score compares with


@dataclass(frozen=True)
class _Curve:
    """One curve of one image: its key in the result, what its inputs start from and which
    patches are removed (deletion-like) or inserted (insertion) after each step."""

    subject: int
    name: str  # a map's name, or "" for a random order
    kind: str  # deletion, negative or insertion
    masks: np.ndarray  # [S + 1, patches] bool


class Perturber:
    """Scores the perturbation curves of images' maps with a loaded model.

    Args:
        loaded: the model and its metadata.
        baseline: ``mean``, ``blur`` or ``zero`` (see the module docstring).
        random_orders: random orders of the random baseline.
        steps: steps of every curve.
        seed: the random orders' seed.
        chunk: perturbed inputs per forward pass.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        baseline: str = "mean",
        random_orders: int = 5,
        steps: int = STEPS,
        seed: int = RANDOM_SEED,
        chunk: int = CHUNK,
    ):
        assert baseline in ("mean", "blur", "zero"), baseline
        self.loaded = loaded
        self.baseline = baseline
        self.random_orders = random_orders
        self.steps = steps
        self.seed = seed
        self.chunk = chunk
        self.classifier = loaded.adapter.num_classes > 0

    # -- planning -------------------------------------------------------------------------

    def _curves(self, index: int, subject: Subject) -> list[_Curve]:
        patches = subject.content.size
        candidates = content_patches(subject.content)
        counts = step_counts(len(candidates), self.steps)
        curves = []
        for name, grid in subject.maps.items():
            for kind in CURVE_KINDS:
                order = removal_order(grid, subject.content, most_relevant_first=kind != "negative")
                curves.append(_Curve(index, name, kind, removal_masks(order, counts, patches)))
        for order in random_orders(candidates, self.random_orders, self.seed):
            for kind in ("deletion", "insertion"):
                curves.append(_Curve(index, "", kind, removal_masks(order, counts, patches)))
        return curves

    def _sources(self, subject: Subject) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, replacement, blurred, content pixels)`` of one subject, on the model's device."""
        x = subject.tensor.to(self.loaded.device)
        _, height, width = x.shape
        inside = _content_pixels((width, height), subject.content_box).to(x.device)
        blurred = torch.where(inside, _blur_inside(x, inside), x)
        if self.baseline == "blur":
            replacement = blurred
        elif self.baseline == "mean":
            colour = (x * inside).sum(dim=(1, 2)) / inside.sum().clamp(min=1)
            replacement = colour[:, None, None].expand_as(x)
        else:  # black: 0 before normalisation
            mean = torch.tensor(self.loaded.data_config["mean"], dtype=x.dtype, device=x.device)
            std = torch.tensor(self.loaded.data_config["std"], dtype=x.dtype, device=x.device)
            replacement = (-mean / std)[:, None, None].expand_as(x)
        return x, replacement, blurred, inside

    def _jobs(self, subjects: Sequence[Subject]) -> tuple[list[tuple[int, str, np.ndarray | None]], list[list[_Curve]]]:
        """Every perturbed input to score: ``(subject, mode, patch mask)``. Per subject, first the
        input with every content patch removed and the blurred input (the end of every deletion
        curve and the start of every insertion curve), then each curve's inner steps."""
        jobs: list[tuple[int, str, np.ndarray | None]] = []
        plans = []
        for index, subject in enumerate(subjects):
            curves = self._curves(index, subject)
            plans.append(curves)
            jobs.append((index, "removed", None))
            jobs.append((index, "blurred", None))
            for curve in curves:
                mode = "insert" if curve.kind == "insertion" else "remove"
                jobs.extend((index, mode, mask) for mask in curve.masks[1:-1])
        return jobs, plans

    def inputs(self, subjects: Sequence[Subject]) -> Iterator[torch.Tensor]:
        """The perturbed inputs of ``subjects``, ``[n, 3, H, W]`` chunks of at most :attr:`chunk`,
        in the order :meth:`curves` scores them (for timing the bare forward passes)."""
        jobs, _ = self._jobs(subjects)
        return self._chunks(subjects, jobs)

    def _chunks(self, subjects: Sequence[Subject], jobs: list) -> Iterator[torch.Tensor]:
        sources = [self._sources(s) for s in subjects]
        grid, patch = self.loaded.grid, self.loaded.patch_size
        for start in range(0, len(jobs), self.chunk):
            yield torch.stack([_perturbed(sources[i], mode, mask, grid, patch) for i, mode, mask in jobs[start : start + self.chunk]])

    # -- scoring --------------------------------------------------------------------------

    def curves(self, subjects: Sequence[Subject]) -> list[Curves]:
        """Every subject's :class:`~reportgen.methods.evaluation.Curves`."""
        if not subjects:
            return []
        adapter = self.loaded.adapter
        jobs, plans = self._jobs(subjects)
        with torch.inference_mode(), torch.random.fork_rng(devices=_rng_devices(self.loaded.device)):
            originals = torch.stack([s.tensor for s in subjects]).to(self.loaded.device)
            features = adapter.forward_features(originals)
            aims, scored_with = self._aims(subjects, features)
            kinds, classes, vectors = self._aim_tensors(aims, features.device)
            owners = torch.arange(len(subjects), device=features.device)
            references = self._scores(features, owners, kinds, classes, vectors)  # [B, M]
            scores = torch.empty((len(jobs), kinds.shape[1]), dtype=torch.float64)
            owners = torch.tensor([i for i, _, _ in jobs], device=features.device)
            for start, batch in zip(range(0, len(jobs), self.chunk), self._chunks(subjects, jobs)):
                owner = owners[start : start + len(batch)]
                value = self._scores(adapter.forward_features(batch.to(self.loaded.device)), owner, kinds, classes, vectors)
                scores[start : start + len(batch)] = (value / references[owner]).double().cpu()
        return self._assemble(subjects, jobs, plans, scores.numpy(), references.double().cpu().numpy(), aims, scored_with)

    def _aims(self, subjects: Sequence[Subject], features: torch.Tensor) -> tuple[list[list[_Aim]], list[dict[str, int]]]:
        """Per subject, every target its curves are scored with (the image's first) and, per map,
        its target's index among them."""
        adapter = self.loaded.adapter
        if self.classifier:
            top = adapter.forward_head(features).float().argmax(dim=-1).tolist()
        embeddings = adapter.forward_head(features, pre_logits=True).float()
        patches = features[:, self.loaded.num_prefix_tokens :].float()
        aims, scored_with = [], []
        for b, subject in enumerate(subjects):
            if self.classifier:
                first = self._class_aim(subject.target_class if subject.target_class is not None else top[b])
            else:
                first = _Aim("label-free", _LABEL_FREE, "label-free", reference=embeddings[b])
            own, keys, which = [first], {_key(first): 0}, {}
            for name in subject.maps:
                target = subject.targets.get(name)
                if target is None:
                    which[name] = 0
                    continue
                if target.kind == "class":
                    aim = self._class_aim(target.class_index)
                else:
                    check_object_width(embeddings.shape[-1], patches.shape[-1])
                    weights = coverage_weights(target.coverage).to(dtype=patches.dtype, device=patches.device)
                    label = target.object_label
                    aim = _Aim("object", _OBJECT_SCORE.format(label=label), f"object {label!r}", object_label=label,
                               reference=weights @ patches[b])
                key = _key(aim)
                if key not in keys:
                    keys[key] = len(own)
                    own.append(aim)
                which[name] = keys[key]
            aims.append(own)
            scored_with.append(which)
        return aims, scored_with

    def _class_aim(self, index: int) -> _Aim:
        name = Targets(self.loaded.adapter).name(index)
        label = f"class {index}" + (f" ({name})" if name else "")
        return _Aim("class", f"the softmax probability of {label}", label, class_index=index)

    def _aim_tensors(self, aims: list[list[_Aim]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, M]`` each target's kind code (-1 past an image's last), ``[B, M]`` its class and
        ``[B, M, D]`` the embedding it compares with (M the most targets of an image)."""
        width = max(len(own) for own in aims)
        depth = next((a.reference.shape[-1] for own in aims for a in own if a.reference is not None), 1)
        kinds = torch.full((len(aims), width), -1, dtype=torch.long)
        classes = torch.zeros((len(aims), width), dtype=torch.long)
        vectors = torch.zeros((len(aims), width, depth), dtype=torch.float32, device=device)
        codes = {"class": _CLASS, "label-free": _LABEL_FREE_KIND, "object": _OBJECT}
        for b, own in enumerate(aims):
            for m, aim in enumerate(own):
                kinds[b, m] = codes[aim.kind]
                if aim.class_index is not None:
                    classes[b, m] = aim.class_index
                if aim.reference is not None:
                    vectors[b, m] = aim.reference
        return kinds.to(device), classes.to(device), vectors

    def _scores(self, features: torch.Tensor, owner: torch.Tensor, kinds, classes, vectors) -> torch.Tensor:
        """``[n, M]`` every target of each input's image (``owner``) on its final tokens
        ``features`` (1 past an image's last target, so the division is harmless)."""
        adapter = self.loaded.adapter
        kind = kinds[owner]
        values = torch.ones(kind.shape, dtype=torch.float32, device=features.device)
        if self.classifier and bool((kind == _CLASS).any()):
            probabilities = adapter.forward_head(features).float().softmax(dim=-1)
            values = torch.where(kind == _CLASS, probabilities.gather(1, classes[owner]), values)
        if bool(((kind == _LABEL_FREE_KIND) | (kind == _OBJECT)).any()):
            embedding = adapter.forward_head(features, pre_logits=True).float()[:, None, :]  # [n, 1, D]
            reference = vectors[owner]  # [n, M, D]
            values = torch.where(kind == _LABEL_FREE_KIND, (embedding * reference).sum(dim=-1), values)
            cosine = torch.nn.functional.cosine_similarity(embedding, reference, dim=-1)
            values = torch.where(kind == _OBJECT, cosine, values)
        return values

    def _assemble(self, subjects, jobs, plans, scores, references, aims, scored_with) -> list[Curves]:
        results = []
        position = 0
        inner = self.steps - 1
        for index, (subject, curves) in enumerate(zip(subjects, plans)):
            removed, blurred = scores[position], scores[position + 1]  # [M]: every target's
            position += 2
            maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in subject.maps}
            own = aims[index]
            random: list[dict[str, list[np.ndarray]]] = [{"deletion": [], "insertion": []} for _ in own]
            for curve in curves:
                middle = scores[position : position + inner]  # [inner, M]
                position += inner
                if curve.kind == "insertion":
                    values = np.concatenate([blurred[None], middle, np.ones((1, middle.shape[1]))])
                else:
                    values = np.concatenate([np.ones((1, middle.shape[1])), middle, removed[None]])
                # A target at or below zero on the unperturbed input (an object whose cosine with
                # the image is not positive) has no ratio to read: dividing by it would turn the
                # curve upside down. Its curves are NaN, so no area is claimed for it.
                values[:, references[index] <= 0] = np.nan
                if curve.name:
                    maps[curve.name][curve.kind] = values[:, scored_with[index][curve.name]]
                else:
                    for t, rows in enumerate(random):
                        rows[curve.kind].append(values[:, t])
            k = len(content_patches(subject.content))
            targets = tuple(
                ScoredTarget(
                    kind=aim.kind, description=aim.description, label=aim.label, reference=float(references[index, t]),
                    random={kind: np.array(rows).reshape(len(rows), self.steps + 1) for kind, rows in random[t].items()},
                    class_index=aim.class_index, object_label=aim.object_label,
                )
                for t, aim in enumerate(own)
            )
            results.append(
                Curves(
                    fractions=step_counts(k, self.steps) / k,
                    maps=maps,
                    targets=targets,
                    scored_with=dict(scored_with[index]),
                    forwards=2 + inner * len(curves) + 1,  # + the unperturbed input
                )
            )
        assert position == len(jobs)
        return results


def _key(aim: _Aim) -> tuple:
    """What makes two targets the same: the class, or the object (its label and box)."""
    if aim.kind == "object":
        return aim.kind, aim.object_label, tuple(aim.reference.tolist())
    return aim.kind, aim.class_index


_LABEL_FREE = (
    "the label-free target (Crabbe & van der Schaar 2022): the inner product of the pooled embedding with "
    "that of the unperturbed input"
)

_OBJECT_SCORE = (
    "the cosine similarity of the pooled image embedding with the embedding of the object {label!r} on the "
    "unperturbed input (its final patch tokens averaged with the box's patch coverage as weights)"
)


def _content_pixels(size: tuple[int, int], box: tuple[float, float, float, float]) -> torch.Tensor:
    """``[1, H, W]`` True for the input pixels (by their centres) inside ``box``: the image."""
    width, height = size
    x0, y0, x1, y1 = box
    xs, ys = torch.arange(width) + 0.5, torch.arange(height) + 0.5
    return (((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :])[None]


def _blur_inside(x: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``x`` blurred with RISE's Gaussian over the pixels ``inside`` only (a normalised convolution:
    each output is the weighted mean of the image pixels under the kernel)."""
    radius = BLUR_KERNEL // 2
    taps = torch.arange(BLUR_KERNEL, dtype=x.dtype, device=x.device) - radius
    kernel = torch.exp(-(taps**2) / (2 * BLUR_SIGMA**2))
    kernel = kernel / kernel.sum()
    weight = inside.to(x.dtype)

    def smooth(t: torch.Tensor) -> torch.Tensor:  # [C, H, W], separable, zero outside
        c = t.shape[0]
        t = torch.nn.functional.conv2d(t[None], kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius), groups=c)
        return torch.nn.functional.conv2d(t, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0), groups=c)[0]

    return smooth(x * weight) / smooth(weight).clamp(min=1e-12)


def _perturbed(
    source: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    mode: str,
    mask: np.ndarray | None,
    grid: tuple[int, int],
    patch: tuple[int, int],
) -> torch.Tensor:
    """One perturbed input: ``removed`` (every content pixel replaced), ``blurred``, ``remove``
    (the patches of ``mask`` replaced) or ``insert`` (the blurred image with the patches of
    ``mask`` put back); padding pixels are always the input's own."""
    x, replacement, blurred, inside = source
    if mode == "removed":
        return torch.where(inside, replacement, x)
    if mode == "blurred":
        return blurred
    pixels = _patch_pixels(mask, grid, patch, x.shape[1:], x.device) & inside
    return torch.where(pixels, replacement, x) if mode == "remove" else torch.where(pixels, x, blurred)


def _patch_pixels(mask: np.ndarray, grid: tuple[int, int], patch: tuple[int, int], size, device) -> torch.Tensor:
    """``[1, H, W]`` True for the pixels of the patches ``mask`` (flat, row by row) marks."""
    rows, cols = grid
    cells = torch.from_numpy(np.ascontiguousarray(mask.reshape(rows, cols))).to(device)
    pixels = cells.repeat_interleave(patch[0], dim=0).repeat_interleave(patch[1], dim=1)
    height, width = size
    out = torch.zeros((height, width), dtype=torch.bool, device=device)
    h, w = min(height, pixels.shape[0]), min(width, pixels.shape[1])
    out[:h, :w] = pixels[:h, :w]
    return out[None]


def _rng_devices(device: torch.device) -> list:
    if torch.device(device).type != "cuda":
        return []
    device = torch.device(device)
    return [device.index if device.index is not None else torch.cuda.current_device()]


def forward_count(maps: int, random: int, steps: int = STEPS) -> int:
    """Forward passes one image's evaluation takes: ``(3 maps + 2 random) * (steps - 1) + 3``."""
    return (len(CURVE_KINDS) * maps + 2 * random) * (steps - 1) + 3

