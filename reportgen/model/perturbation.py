"""The forward passes of the evaluation: each map's perturbation curves scored by the model.

For every image of a batch and every map, the perturbed inputs of the deletion, negative and
insertion curves (orders and step counts from :mod:`reportgen.methods.evaluation`), and those of
the seeded random orders, are made and scored in chunks of a fixed number of inputs, the images of
a batch together. A removed patch's pixels that hold image are replaced by the baseline (the
image's mean colour over the image, the image blurred, or black); the pixels of letterbox padding
are never changed, so padding neither hides nor leaks anything.

The score is the image's target on the perturbed input, divided by its value on the unperturbed
input: for a classifier, the softmax probability of the target class (the class the gradient
methods explain when they ran, else the class chosen with ``attention.target_classes`` (the first), else the
top-1 class of the unperturbed input); for a headless model, the label-free target of Crabbe &
van der Schaar (2022), the inner product of the pooled embedding with that of the unperturbed
input (divided by its squared norm). The insertion curves start from the image blurred with a
Gaussian of sigma 5 input pixels (RISE's substrate: 11-pixel kernel, sigma 5), taken over the
image only (a normalised convolution), so padding does not bleed into it.

Under ``torch.inference_mode``; the caller's RNG state is kept (a model in training mode would
draw dropout masks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reportgen.methods.evaluation import (
    CURVE_KINDS,
    RANDOM_SEED,
    STEPS,
    Curves,
    content_patches,
    random_orders,
    removal_masks,
    removal_order,
    step_counts,
)
from reportgen.model.loading import LoadedModel

#: RISE's blur for the insertion substrate: an 11-pixel Gaussian kernel of sigma 5 (input pixels).
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0

#: Perturbed inputs per forward pass.
CHUNK = 32


@dataclass(frozen=True)
class Subject:
    """One image to evaluate.

    Attributes:
        tensor: ``[3, H, W]`` the preprocessed (normalised) model input.
        maps: per map name, ``[rows, cols]`` the map.
        content: ``[rows, cols]`` each patch's image fraction (0: padding).
        content_box: ``(x0, y0, x1, y1)`` the part of the input that is image, in input pixels.
        target_class: the class whose probability is scored (a classifier), or None for the
            top-1 class of the unperturbed input (ignored for a headless model).
    """

    tensor: torch.Tensor
    maps: dict[str, np.ndarray]
    content: np.ndarray
    content_box: tuple[float, float, float, float]
    target_class: int | None = None


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
            reference = self._head(adapter.forward_features(originals))  # [B, classes] or [B, C]
            if self.classifier:
                probabilities = reference.softmax(dim=-1)
                classes = torch.tensor(
                    [s.target_class if s.target_class is not None else int(p.argmax()) for s, p in zip(subjects, probabilities)],
                    device=reference.device,
                )
                references = probabilities.gather(1, classes[:, None])[:, 0]
                describe = [self._class_description(int(c)) for c in classes.tolist()]
            else:
                classes = None
                references = (reference * reference).sum(dim=-1)
                describe = [_LABEL_FREE] * len(subjects)
            scores = torch.empty(len(jobs), dtype=torch.float64)
            owners = torch.tensor([i for i, _, _ in jobs], device=reference.device)
            for start, batch in zip(range(0, len(jobs), self.chunk), self._chunks(subjects, jobs)):
                owner = owners[start : start + len(batch)]
                out = self._head(adapter.forward_features(batch.to(self.loaded.device)))
                if self.classifier:
                    value = out.softmax(dim=-1).gather(1, classes[owner][:, None])[:, 0]
                else:
                    value = (out * reference[owner]).sum(dim=-1)
                scores[start : start + len(batch)] = (value / references[owner]).double().cpu()
        return self._assemble(subjects, jobs, plans, scores.numpy(), references.double().cpu().numpy(), describe)

    def _head(self, features: torch.Tensor) -> torch.Tensor:
        adapter = self.loaded.adapter
        if self.classifier:
            return adapter.forward_head(features).float()
        return adapter.forward_head(features, pre_logits=True).float()

    def _class_description(self, index: int) -> str:
        from reportgen.model.targets import Targets

        name = Targets(self.loaded.adapter).name(index)
        return f"the softmax probability of class {index}" + (f" ({name})" if name else "")

    def _assemble(self, subjects, jobs, plans, scores, references, describe) -> list[Curves]:
        results = []
        position = 0
        inner = self.steps - 1
        for index, (subject, curves) in enumerate(zip(subjects, plans)):
            removed, blurred = scores[position], scores[position + 1]
            position += 2
            maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in subject.maps}
            random: dict[str, list[np.ndarray]] = {"deletion": [], "insertion": []}
            for curve in curves:
                middle = scores[position : position + inner]
                position += inner
                if curve.kind == "insertion":
                    values = np.concatenate([[blurred], middle, [1.0]])
                else:
                    values = np.concatenate([[1.0], middle, [removed]])
                if curve.name:
                    maps[curve.name][curve.kind] = values
                else:
                    random[curve.kind].append(values)
            k = len(content_patches(subject.content))
            results.append(
                Curves(
                    fractions=step_counts(k, self.steps) / k,
                    maps=maps,
                    random={kind: np.array(rows).reshape(len(rows), self.steps + 1) for kind, rows in random.items()},
                    target=describe[index],
                    reference=float(references[index]),
                    forwards=2 + inner * len(curves) + 1,  # + the unperturbed input
                )
            )
        assert position == len(jobs)
        return results


_LABEL_FREE = (
    "the label-free target (Crabbe & van der Schaar 2022): the inner product of the pooled embedding with "
    "that of the unperturbed input"
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

