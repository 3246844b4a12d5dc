"""Object detection for experiment 3: a DETR detector from ``transformers``.

:func:`load_detector` loads a DETR checkpoint (a hub name such as ``facebook/detr-resnet-50`` or a
local folder written by ``save_pretrained``) together with its own image processor, and
:meth:`Detector.detect` turns one PIL image into :class:`~reportgen.config.ObjectBox` objects in
that image's pixel coordinates.

Any failure to load the detector is raised as a single :class:`DetectorUnavailable` (a
:class:`~reportgen.errors.ModelLoadError`) whose message says what to do and whose ``reason`` says
why in one line fit to publish on the site; the original exception is kept as ``__cause__``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from reportgen.config import MAX_LABEL_LENGTH, MAX_OBJECTS, ObjectBox
from reportgen.errors import ModelLoadError
from reportgen.model.hub import hub_offline, is_cached, probe_hub, summarise_error

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

DEFAULT_DETECTOR = "facebook/detr-resnet-50"

# post_process_object_detection keeps scores strictly *greater* than its threshold; we ask it for a
# little more than we need and apply ``score >= threshold`` ourselves, exactly.
_POSTPROCESS_MARGIN = 1e-3


class DetectorUnavailable(ModelLoadError):
    """The detector could not be loaded.

    Args:
        message: the whole message for the person running the build, with what to do.
        reason: why, in one line for the readers of the site: it names a folder only as the user
            gave it, and the home folder and Hugging Face cache by name, not by path.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class Detector:
    """A DETR object detector from transformers, with its own image processor.

    Args:
        model: a ``DetrForObjectDetection`` (or anything with the same outputs: ``logits`` over
            ``num_labels + 1`` classes, the last being "no object", and normalised ``pred_boxes``).
            It is put in eval mode.
        processor: its image processor (``DetrImageProcessor`` / ``DetrImageProcessorPil``), used
            for pre-processing and for ``post_process_object_detection``.
        threshold: minimum score, in [0, 1], of a returned object.
        name: the hub name or folder the detector came from (for messages and reports).
    """

    def __init__(self, model: Any, processor: Any, threshold: float, name: str):
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"detector threshold must be between 0 and 1, got {threshold}")
        if not hasattr(processor, "post_process_object_detection"):
            raise TypeError(
                f"{type(processor).__name__} has no post_process_object_detection(); "
                "a DETR image processor is needed"
            )
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.name = name

    def __repr__(self) -> str:
        return f"Detector(name={self.name!r}, threshold={self.threshold})"

    def detect(self, image: Image.Image) -> list[ObjectBox]:
        """Objects with score >= threshold, boxes in the given image's pixel coordinates (clipped to the image),
        labels from model.config.id2label (cut to MAX_LABEL_LENGTH), sorted by descending score, at most
        MAX_OBJECTS of them. Runs under torch.inference_mode()."""
        import torch

        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size

        with torch.inference_mode():
            inputs = self.processor(images=image, return_tensors="pt")
            inputs = inputs.to(self.model.device)
            outputs = self.model(**inputs)
            (result,) = self.processor.post_process_object_detection(
                outputs,
                threshold=self.threshold - _POSTPROCESS_MARGIN,
                target_sizes=[(height, width)],
            )
            scores = result["scores"].float().cpu().tolist()
            labels = result["labels"].cpu().tolist()
            boxes = result["boxes"].float().cpu().tolist()

        id2label = getattr(self.model.config, "id2label", None) or {}
        found: list[ObjectBox] = []
        for score, label, (x0, y0, x1, y1) in zip(scores, labels, boxes):
            if score < self.threshold:
                continue
            x0, x1 = _clip(x0, width), _clip(x1, width)
            y0, y1 = _clip(y0, height), _clip(y1, height)
            if not (x1 > x0 and y1 > y0):  # nothing of the box is left inside the image
                continue
            name = str(id2label.get(label, id2label.get(str(label), f"LABEL_{label}")))[:MAX_LABEL_LENGTH]
            found.append(ObjectBox(label=name, x0=x0, y0=y0, x1=x1, y1=y1, score=score))
        # sorted() is stable: equal scores keep the model's query order. The manifest's bounds on
        # objects per image and label length hold for detections too (a detector config is input).
        return sorted(found, key=lambda box: box.score, reverse=True)[:MAX_OBJECTS]


def _clip(value: float, limit: int) -> float:
    return min(max(float(value), 0.0), float(limit))


def load_detector(name: str, threshold: float) -> Detector:
    """DetrForObjectDetection.from_pretrained + DetrImageProcessor (AutoImageProcessor is fine) from the hub or HF cache.

    ``name`` is a hub model name (``owner/model``) or a local folder holding a DETR model and its
    image processor saved with ``save_pretrained``. Anything that goes wrong while loading is
    raised as one :class:`ModelLoadError` (the original exception is its ``__cause__``).

    How the hub is used:

    * If ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set *when this is called*, only the
      local cache is read (``local_files_only=True``); huggingface_hub itself reads these variables
      only once, at import.
    * Otherwise, if the model's config is not in the local cache yet, the hub is first asked once,
      without retries, for that file; if the hub cannot be reached (or does not know the name) the
      error is raised at once, instead of after huggingface_hub's retry loop (about 25 s without
      DNS, several minutes if the connection times out).
    """
    try:
        import torch
        from transformers import AutoImageProcessor, DetrForObjectDetection
    except Exception as err:  # transformers missing or broken
        cause = f"torch or transformers could not be imported ({summarise_error(err)})"
        raise DetectorUnavailable(
            f"Could not load the object detector {name!r}: {cause}. Install reportgen's dependencies "
            "(pip install reportgen), or pass --detector none to use only the boxes given in the manifest.",
            _public(cause, name),
        ) from err

    source = os.path.expanduser(name)
    is_folder = os.path.isdir(source)
    if not is_folder:
        source = name
    offline = not is_folder and hub_offline()
    try:
        if not is_folder and not offline and not is_cached(name, "config.json"):
            probe_hub(name, "config.json")
        # Weights missing from a checkpoint are initialised randomly: keep the global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            model = DetrForObjectDetection.from_pretrained(source, local_files_only=offline)
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline)
        return Detector(model, processor, threshold, name)  # checks the processor is DETR's
    except Exception as err:
        raise DetectorUnavailable(
            _load_failure_message(name, err),
            f"could not be loaded {_where(name, name)}: {_public(summarise_error(err), name)}",
        ) from err


def _where(name: str, folder: str) -> str:
    """Where loading was tried, naming a local folder as ``folder``."""
    if os.path.isdir(os.path.expanduser(name)):
        return f"from the local folder {folder}"
    if _looks_like_path(name):
        return f"(there is no folder {folder}, and it is not a model name on the Hugging Face hub)"
    where = "from the Hugging Face hub or the local Hugging Face cache"
    if hub_offline():
        where += " (offline mode is on, so only the cache was tried)"
    return where


def _public(text: str, name: str) -> str:
    """``text`` without local paths the user did not give: the detector's folder is named as given,
    the Hugging Face cache and the home folder by name."""
    replacements = [(os.path.expanduser("~"), "~")]
    try:
        from huggingface_hub import constants

        replacements += [(str(constants.HF_HUB_CACHE), "the Hugging Face cache"), (str(constants.HF_HOME), "HF_HOME")]
    except ImportError:  # reported by the caller
        pass
    # Longest first, so a path inside another is replaced whole.
    replacements.sort(key=lambda item: len(item[0]), reverse=True)

    def hide(part: str) -> str:
        for path, shown in replacements:
            if len(path) > 1:
                part = part.replace(path, shown)
        return part

    folder = os.path.expanduser(name)
    return name.join(hide(part) for part in text.split(folder)) if folder else hide(text)


def _load_failure_message(name: str, err: BaseException) -> str:
    return (
        f"Could not load the object detector {name!r} {_where(name, os.path.expanduser(name))}: {summarise_error(err)}. "
        "To fix this, either run reportgen once with internet access so the detector is downloaded "
        "and cached (or set HF_HOME to a Hugging Face cache that already has it), "
        "pass --detector none to use only the boxes given in the manifest, "
        "or pass --detector PATH with a local folder holding a DETR model and its image processor "
        "saved with save_pretrained()."
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or name.count("/") > 1
