"""Loading and validating the YAML manifest that drives ``reportgen build``.

The manifest names the images to analyse (with optional hand-drawn object boxes) and the
settings of the model, the attention experiments, the object detector and the output site::

    title: Sample report                  # shortcut for output.title
    model: {name: imgfocus-vits14, input_size: 224}
    attention: {head_fusion: mean, discard_ratio: 0.0}
    detector: {name: none, threshold: 0.9}
    output: {dir: ../site, cmap: inferno, alpha: 0.5}
    images:
      - path: chelsea.png
        id: chelsea
        title: Chelsea the cat
        kind: single
        objects:
          - {label: cat head, box: [0, 0, 396, 300]}

This module only reads and checks text: it never decodes an image (it only checks that the
files exist) and never touches a model. :func:`load_manifest` collects every problem it
finds and raises them together as one :class:`~reportgen.errors.ManifestError`, so a user
fixes a manifest in one pass instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import stat
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from reportgen.errors import ManifestError
from reportgen.files import NotRegularFile, file_kind, open_regular
from reportgen.methods import DEFAULT_METHODS, HEAD_FUSIONS

__all__ = [
    "IMAGE_KINDS",
    "RESERVED_SLUGS",
    "AttentionSettings",
    "DetectorSettings",
    "ImageEntry",
    "Manifest",
    "ModelSettings",
    "ObjectBox",
    "OutputSettings",
    "SettingsError",
    "load_manifest",
    "number_problem",
    "text_problem",
    "slugify",
]

IMAGE_KINDS = ("single", "multi")

#: Slugs that would clash with the site's own files (index.html, results.json, ...) or with
#: device names on Windows; an image whose id slugifies to one of these gets "-image" appended.
RESERVED_SLUGS = frozenset(
    {"index", "results", "con", "prn", "aux", "nul"}
    | {f"com{i}" for i in range(1, 10)}
    | {f"lpt{i}" for i in range(1, 10)}
)

_SEPARATOR_RUN = re.compile(r"[._-]{2,}")

#: Longest slug, including any "-2" suffix added to make it unique.
MAX_SLUG_LENGTH = 80

# --------------------------------------------------------------------------------------------
# Bounds: every size a manifest (or the command line) can set. A value over a bound is a located
# manifest error (or a usage error for an option), never a slow build, a huge figure or a crash.
# --------------------------------------------------------------------------------------------

#: Largest manifest file read: a manifest of thousands of images is well under 1 MiB; anything
#: bigger is not a manifest (and /dev/zero would otherwise be read until memory runs out).
MAX_MANIFEST_BYTES = 10 * 1024 * 1024

#: Longest image id. An id is also the default title and is shown on every card; 200 characters
#: is a long sentence (a file-name stem used as the id is bounded by it too).
MAX_ID_LENGTH = 200

#: Longest object label: labels are tick labels of the similarity figure and rows of its tables.
MAX_LABEL_LENGTH = 200

#: Longest report or image title.
MAX_TITLE_LENGTH = 500

#: Longest image caption (a paragraph).
MAX_CAPTION_LENGTH = 2000

#: Longest name of a model, detector or colour map, and longest text value of a model option.
MAX_NAME_LENGTH = 200

#: Longest path written in the manifest (Linux's PATH_MAX).
MAX_PATH_LENGTH = 4096

#: Most objects (boxes) on one image: the similarity figure and tables grow with its square.
MAX_OBJECTS = 64

#: Largest model.input_size accepted; anything bigger is a typo that would only fail later
#: with an out-of-memory error deep inside the model.
MAX_INPUT_SIZE = 4096

# timm.create_model arguments that have their own manifest keys; passing them twice through
# model.options would either clash or silently override the documented setting.
_RESERVED_OPTIONS = {
    "model_name": "set this with model.name instead",
    "pretrained": "set this with model.pretrained instead",
    "img_size": "set this with model.input_size instead",
}

# timm.create_model arguments (timm 1.0) that choose a file, folder, URL or hub repository the
# weights are read from. Weights must come through model.weights / --weights, whose file is
# hashed for the cache, named on the site and protected from deletion; these would bypass all that.
_WEIGHTS_HINT = "weights from a file must be given with model.weights (or --weights)"
_FILE_OPTIONS = {
    "checkpoint_path": f"names a weights file: {_WEIGHTS_HINT}",
    "pretrained_cfg": (
        f"chooses where the weights come from: {_WEIGHTS_HINT}; a pretrained tag goes in model.name "
        "(e.g. vit_base_patch16_224.augreg_in21k)"
    ),
    "pretrained_cfg_overlay": f"can name a weights file, URL or hub repository: {_WEIGHTS_HINT}",
    "cache_dir": f"names a folder weights are read from: {_WEIGHTS_HINT} (or set HF_HOME for the hub cache)",
}

_TOP_KEYS = ("title", "model", "attention", "detector", "output", "images")
_MODEL_KEYS = ("name", "weights", "input_size", "pretrained", "options")
_ATTENTION_KEYS = ("head_fusion", "discard_ratio")
_DETECTOR_KEYS = ("name", "threshold")
_OUTPUT_KEYS = ("dir", "title", "cmap", "alpha")
_IMAGE_KEYS = ("path", "id", "title", "caption", "kind", "objects")
_OBJECT_KEYS = ("label", "box")


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectBox:
    """An object in an image: a labelled axis-aligned box.

    Attributes:
        label: what the object is ("cat", "wheel"); kept verbatim.
        x0: left edge, in pixels of the original (EXIF-upright) image.
        y0: top edge.
        x1: right edge; greater than ``x0``.
        y1: bottom edge; greater than ``y0``.
        score: the detector's confidence, or None for a box written in the manifest.
    """

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    score: float | None = None

    @property
    def width(self) -> float:
        """Width of the box in pixels."""
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        """Height of the box in pixels."""
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        """Area of the box in square pixels."""
        return self.width * self.height

    def as_tuple(self) -> tuple[float, float, float, float]:
        """Return the box as ``(x0, y0, x1, y1)``."""
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass(frozen=True)
class ImageEntry:
    """One image of the manifest.

    Attributes:
        index: position in the manifest's ``images`` list (0-based).
        id: the user's id, or the file's stem when the entry has none.
        slug: a file-name stem derived from ``id`` that is safe on every file system and
            unique within the manifest (see :func:`slugify`).
        path: absolute path of the image file.
        title: display title; defaults to ``id``.
        caption: display caption; defaults to "".
        kind: "single" (one main object) or "multi" (several objects).
        objects: boxes written in the manifest.
    """

    index: int
    id: str
    slug: str
    path: Path
    title: str
    caption: str
    kind: str
    objects: tuple[ObjectBox, ...]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class SettingsError(ValueError):
    """Settings with impossible values, each problem with the key it is about.

    The settings dataclasses raise it from ``__post_init__``; the manifest validator reports each
    problem under its manifest key, the command line under its option. Their rules live only here.

    Attributes:
        section: "model", "attention", "detector" or "output".
        problems: ``(key, message)`` pairs; ``key`` is a field name ("input_size") or a dotted
            path below one ("options.checkpoint_path").
    """

    def __init__(self, section: str, problems: list[tuple[str, str]]):
        self.section = section
        self.problems = list(problems)
        super().__init__("; ".join(f"{section}.{key}: {message}" for key, message in self.problems))


def text_problem(value: Any, limit: int, *, allow_empty: bool = True) -> str | None:
    """What is wrong with ``value`` as a piece of text of at most ``limit`` characters, or None.

    Text must be a ``str`` without lone surrogates: those come from ``\\ud800``-style escapes or
    from file names that are not UTF-8, and could not be written to a UTF-8 page later.
    """
    if not isinstance(value, str):
        return f"expected a string, got {_show(value)}{_quote_hint(value)}"
    if not allow_empty and not value.strip():
        return "must not be empty"
    if len(value) > limit:
        return f"too long: {len(value)} characters, more than the limit of {limit}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"contains U+{ord(value[err.start]):04X} at position {err.start}, which is not a character "
            "(a lone surrogate, from a \\u escape or a file name that is not UTF-8)"
        )
    return None


def _path_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, os.PathLike):
        return f"expected a path to {what}, got {_show(value)}"
    name = os.fspath(value)
    return text_problem(name, MAX_PATH_LENGTH, allow_empty=False) if isinstance(name, str) else f"expected a text path, got {_show(name)}"


def number_problem(value: Any, *, low: float, high: float, low_ok: bool, high_ok: bool) -> str | None:
    """What is wrong with ``value`` as a finite number between ``low`` and ``high``, or None."""
    if not _is_number(value):
        return f"expected a number, got {_show(value)}"
    number = _finite(value)
    if number is None:
        return f"expected a finite number, got {_show(value)}"
    above = number >= low if low_ok else number > low
    below = number <= high if high_ok else number < high
    if not (above and below):
        rule = f"{low:g} {'<=' if low_ok else '<'} value {'<=' if high_ok else '<'} {high:g}"
        return f"must satisfy {rule}, got {_show(value)}"
    return None


def _options_problems(options: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The options as a plain dict (lists become tuples), and the problems with them."""
    if not isinstance(options, Mapping):
        return {}, [("options", f"expected a mapping of timm.create_model arguments, got {_show(options)}")]
    result: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in options.items():
        if not isinstance(key, str) or not key.isidentifier() or text_problem(key, MAX_NAME_LENGTH):
            problems.append(("options", f"{_show(key)} is not a valid keyword argument name"))
            continue
        where = f"options.{key}"
        refused = _RESERVED_OPTIONS.get(key) or _FILE_OPTIONS.get(key)
        if refused:
            problems.append((where, refused))
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(_is_option_scalar(v) for v in values):
            problems.append((where, f"expected a number, string, true/false, null or a list of those, got {_show(value)}"))
            continue
        texts = [text_problem(v, MAX_NAME_LENGTH) for v in values if isinstance(v, str)]
        if any(texts):
            problems.append((where, next(t for t in texts if t)))
            continue
        result[key] = tuple(value) if isinstance(value, list) else value  # a tuple keeps the settings immutable
    return result, problems


@dataclass(frozen=True)
class ModelSettings:
    """Which Vision Transformer to run.

    Attributes:
        name: a timm model name, or "imgfocus-vits14" for the offline model.
        weights: local weights file (safetensors or torch state dict), or None.
        input_size: square input size in pixels, at most :data:`MAX_INPUT_SIZE`; None for the
            model's default.
        pretrained: False builds the model with random weights (tests, timing).
        options: extra keyword arguments for ``timm.create_model`` (read-only mapping); none that
            names a weights file (see :data:`_FILE_OPTIONS`).

    Raises:
        SettingsError: a field has an impossible value (also from :meth:`Manifest.with_overrides`).
    """

    name: str = "vit_base_patch16_224"
    weights: Path | None = None
    input_size: int | None = None
    pretrained: bool = True
    # hash=False: a mapping is not hashable, and the settings should still be.
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        name = text_problem(self.name, MAX_NAME_LENGTH, allow_empty=False)
        if name:
            problems.append(("name", name))
        if isinstance(self.weights, str):
            object.__setattr__(self, "weights", Path(self.weights))
        weights = _path_problem(self.weights, "a weights file") if self.weights is not None else None
        if weights:
            problems.append(("weights", weights))
        size = self.input_size
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                problems.append(("input_size", f"expected a positive integer, got {_show(size)}"))
            elif size > MAX_INPUT_SIZE:
                problems.append(("input_size", f"{_show(size)} is too large (at most {MAX_INPUT_SIZE})"))
        if not isinstance(self.pretrained, bool):
            problems.append(("pretrained", f"expected true or false, got {_show(self.pretrained)}"))
        options, option_problems = _options_problems(self.options)
        problems += option_problems
        if problems:
            raise SettingsError("model", problems)
        # A private copy behind a read-only view keeps the frozen dataclass really frozen.
        object.__setattr__(self, "options", MappingProxyType(options))


@dataclass(frozen=True)
class AttentionSettings:
    """How attention maps are computed.

    Attributes:
        head_fusion: how attention rollout merges the heads of a layer; one of
            :data:`HEAD_FUSIONS`.
        discard_ratio: fraction of the weakest attention weights rollout drops, 0 <= r < 1.

    Raises:
        SettingsError: a field has an impossible value.
    """

    head_fusion: str = "mean"
    discard_ratio: float = 0.0

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if not isinstance(self.head_fusion, str) or self.head_fusion not in HEAD_FUSIONS:
            problems.append(("head_fusion", f"expected one of {', '.join(HEAD_FUSIONS)}, got {_show(self.head_fusion)}"))
        ratio = number_problem(self.discard_ratio, low=0, high=1, low_ok=True, high_ok=False)
        if ratio:
            problems.append(("discard_ratio", ratio))
        if problems:
            raise SettingsError("attention", problems)
        object.__setattr__(self, "discard_ratio", float(self.discard_ratio))


@dataclass(frozen=True)
class DetectorSettings:
    """The object detector that finds boxes in addition to the manifest's own.

    Attributes:
        name: a Hugging Face object-detection model, or None to use only manifest boxes
            (the manifest and the command line spell this "none").
        threshold: minimum detector confidence, 0 < t <= 1.

    Raises:
        SettingsError: a field has an impossible value.
    """

    name: str | None = "facebook/detr-resnet-50"
    threshold: float = 0.9

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if isinstance(self.name, str) and self.name.strip().lower() == "none":
            object.__setattr__(self, "name", None)
        name = text_problem(self.name, MAX_NAME_LENGTH, allow_empty=False) if self.name is not None else None
        if name:
            problems.append(("name", name))
        threshold = number_problem(self.threshold, low=0, high=1, low_ok=False, high_ok=True)
        if threshold:
            problems.append(("threshold", threshold))
        if problems:
            raise SettingsError("detector", problems)
        object.__setattr__(self, "threshold", float(self.threshold))


@dataclass(frozen=True)
class OutputSettings:
    """Where and how the site is written.

    Attributes:
        dir: output folder, or None to let the command line choose.
        title: title of the report, at most :data:`MAX_TITLE_LENGTH` characters.
        cmap: matplotlib colour-map name for the heat maps.
        alpha: opacity of the heat-map overlay, 0 < a <= 1.

    Raises:
        SettingsError: a field has an impossible value.
    """

    dir: Path | None = None
    title: str = "reportgen report"
    cmap: str = "inferno"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if isinstance(self.dir, str):
            object.__setattr__(self, "dir", Path(self.dir))
        folder = _path_problem(self.dir, "a folder") if self.dir is not None else None
        if folder:
            problems.append(("dir", folder))
        title = text_problem(self.title, MAX_TITLE_LENGTH)
        if title:
            problems.append(("title", title))
        cmap = text_problem(self.cmap, MAX_NAME_LENGTH, allow_empty=False)
        if not cmap and self.cmap != "inferno":  # no matplotlib import for the default
            cmap = _unknown_colormap(self.cmap)
        if cmap:
            problems.append(("cmap", cmap))
        alpha = number_problem(self.alpha, low=0, high=1, low_ok=False, high_ok=True)
        if alpha:
            problems.append(("alpha", alpha))
        if problems:
            raise SettingsError("output", problems)
        object.__setattr__(self, "alpha", float(self.alpha))


_SECTION_TYPES = {
    "model": ModelSettings,
    "attention": AttentionSettings,
    "detector": DetectorSettings,
    "output": OutputSettings,
}


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes:
        path: absolute path of the manifest file.
        model: model settings.
        attention: attention settings.
        detector: detector settings.
        output: output settings.
        images: the images, in manifest order, with unique ids and slugs.
    """

    path: Path
    model: ModelSettings
    attention: AttentionSettings
    detector: DetectorSettings
    output: OutputSettings
    images: tuple[ImageEntry, ...]
    methods: tuple[str, ...] = DEFAULT_METHODS

    def with_overrides(self, **sections: Mapping[str, Any] | None) -> Manifest:
        """Return a copy with some settings replaced, e.g. from command-line options.

        Values must already have their final types (the command line parses them); paths
        are used as given, not resolved against the manifest's folder.

        Args:
            **sections: per section ("model", "attention", "detector", "output"), a mapping of
                field name to new value; None or an empty mapping changes nothing.

        Returns:
            A new manifest; this one is unchanged.

        Raises:
            ValueError: an unknown section or field, or a value the settings reject.

        Example:
            >>> m.with_overrides(model={"name": "vit_small_patch16_224"}, detector={"threshold": 0.5})
        """
        changes: dict[str, Any] = {}
        for section, values in sections.items():
            settings_type = _SECTION_TYPES.get(section)
            if settings_type is None:
                raise ValueError(
                    f"unknown manifest section {section!r} (allowed: {', '.join(sorted(_SECTION_TYPES))})"
                )
            if not values:
                continue
            if not isinstance(values, Mapping):
                raise ValueError(f"overrides for {section!r} must be a mapping of field names to values")
            allowed = [f.name for f in dataclasses.fields(settings_type)]
            unknown = [name for name in values if name not in allowed]
            if unknown:
                raise ValueError(
                    f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                    f"in section {section!r} (allowed: {', '.join(sorted(allowed))})"
                )
            changes[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Slugs
# --------------------------------------------------------------------------------------------


def slugify(text: str) -> str:
    """Turn an image id into a safe file-name stem (not yet made unique).

    Accents are folded to ASCII ("Café" -> "cafe"); other letters and digits outside ASCII
    become their code point ("猫" -> "u732b") so ids in other scripts stay distinct and
    readable; everything else becomes "-". The result contains only ``[a-z0-9._-]``, starts
    and ends with a letter or digit, never contains "..", is at most
    :data:`MAX_SLUG_LENGTH` characters, is never empty ("image") and never starts with one
    of :data:`RESERVED_SLUGS` ("index" -> "index-image", "con.txt" -> "con-image.txt").

    Args:
        text: the image id.

    Returns:
        The slug.
    """
    parts: list[str] = []
    for char in unicodedata.normalize("NFKD", str(text)):
        if unicodedata.combining(char):
            continue  # the accent of a decomposed "é"
        lower = char.lower()
        if lower.isascii() and (lower.isalnum() or lower in "._-"):
            parts.append(lower)
        elif char.isalnum():
            parts.append(f"-u{ord(char):x}-")
        else:
            parts.append("-")
    slug = "".join(parts)
    slug = _collapse_separators(slug)
    slug = _trim(slug[:MAX_SLUG_LENGTH])
    if not slug:
        slug = "image"
    head, dot, rest = slug.partition(".")
    if head in RESERVED_SLUGS:
        # Windows also reserves "con.txt", and "index.html" as a stem would read confusingly.
        slug = _trim(f"{head}-image{dot}{rest}"[:MAX_SLUG_LENGTH])
    return slug


def _collapse_separators(slug: str) -> str:
    # Runs of separators become one, so ".." (a parent-directory reference) cannot survive
    # and "a -- b" reads as "a-b"; a run of mixed punctuation ("._", ".-") becomes a dash.
    return _SEPARATOR_RUN.sub(lambda m: m.group(0)[0] if len(set(m.group(0))) == 1 else "-", slug)


def _trim(slug: str) -> str:
    # Leading dots would hide the file; leading/trailing separators look accidental.
    return slug.strip("._-")


def _unique_slugs(ids: list[str]) -> list[str]:
    taken: set[str] = set()
    slugs = []
    for image_id in ids:
        base = slugify(image_id)
        slug = base
        number = 2
        while slug in taken:
            suffix = f"-{number}"
            slug = _trim(base[: MAX_SLUG_LENGTH - len(suffix)]) + suffix
            number += 1
        taken.add(slug)
        slugs.append(slug)
    return slugs


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read, check and return the manifest at ``path``.

    Relative paths inside the manifest (images, model weights, output folder) are resolved
    against the manifest's folder. Only the existence of files is checked here; images are
    decoded (and boxes checked against their size) later.

    Args:
        path: the manifest file.

    Returns:
        The validated manifest.

    Raises:
        ManifestError: the file is missing, unreadable, not valid YAML, or has any invalid
            content; the error lists every problem found, each naming the entry and key.
    """
    manifest_path = Path(os.path.abspath(os.fspath(path)))
    data, yaml_problems = _read_yaml(manifest_path)
    try:
        problems, manifest = _Validator(manifest_path).run(data)
        problems = yaml_problems + problems
    except ManifestError:
        raise
    except Exception as exc:  # a bug here must still reach the user as a plain message
        raise ManifestError(
            manifest_path,
            [f"unexpected error while checking the manifest ({type(exc).__name__}: {exc}); please report this"],
        ) from exc
    if problems:
        raise ManifestError(manifest_path, problems)
    assert manifest is not None
    return manifest


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` under its own name, so no global resolver is touched."""


def _read_yaml(path: Path) -> tuple[Any, list[str]]:
    """Parse the manifest file.

    Returns:
        The parsed document and the problems that do not stop validation (duplicate keys).

    Raises:
        ManifestError: the file cannot be read or is not valid YAML.
    """
    try:
        raw = _read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(path, ["manifest file not found"]) from None
    except IsADirectoryError:
        raise ManifestError(path, ["is a directory, not a manifest file"]) from None
    except PermissionError:
        raise ManifestError(path, ["cannot read the manifest file: permission denied"]) from None
    except NotRegularFile as exc:
        raise ManifestError(path, [f"is {exc.kind}, not a manifest file; only regular files are read"]) from None
    except _TooLarge:
        raise ManifestError(
            path, [f"is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB, the limit for a manifest"]
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(path, [f"cannot read the manifest file: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError(path, [f"not UTF-8 text: undecodable byte at line {line} (byte offset {exc.start})"]) from None

    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node)
        return (loader.construct_document(node) if node is not None else None), duplicates
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(path, [_describe_yaml_error(exc)]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ManifestError(
            path, [f"invalid YAML at line {line}, column {column}: unacceptable character #x{exc.character:04x}"]
        ) from None
    except RecursionError:
        raise ManifestError(path, ["invalid YAML: nested too deeply"]) from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python refuses ints of more than 4300 digits
            raise ManifestError(path, ["invalid YAML: a number has more than 4300 digits"]) from None
        raise ManifestError(path, [f"invalid YAML: {_short(str(exc))}"]) from None
    except Exception as exc:  # the YAML library's own checks are not all YAMLErrors
        raise ManifestError(path, [f"invalid YAML: {type(exc).__name__}: {_short(str(exc))}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


class _TooLarge(OSError):
    """The file is larger than allowed."""


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO would otherwise wait for a writer for ever) and checked on
    the open descriptor, so the file checked is the file read; at most ``limit + 1`` bytes are
    read, so a file that grows meanwhile cannot exhaust memory either.

    Raises:
        IsADirectoryError, NotRegularFile: a folder, FIFO, device or socket.
        _TooLarge: more than ``limit`` bytes.
        OSError: the file cannot be opened or read.
    """
    fd, info = open_regular(path)
    try:
        if info.st_size > limit:
            raise _TooLarge()
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise _TooLarge()
    return b"".join(chunks)


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = exc.problem or "invalid syntax"
    if exc.context and problem.startswith("but "):
        # The composer splits one sentence in two: "expected a single document" / "but found ...".
        return f"invalid YAML{where}: {exc.context}, {problem}"
    message = f"invalid YAML{where}: {problem}"
    if exc.context:
        context_mark = exc.context_mark
        context_where = (
            f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
            if context_mark is not None and context_mark is not mark
            else ""
        )
        message += f" ({exc.context}{context_where})"
    return message


def _duplicate_keys(root: yaml.Node | None) -> list[str]:
    """Find keys written twice in one mapping: YAML keeps the last silently, hiding typos."""
    problems: list[str] = []
    stack = [root] if root is not None else []
    seen_nodes: set[int] = set()  # aliases make the node graph a DAG (or even cyclic)
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident = (key_node.tag, key_node.value)
                    if ident in keys:
                        mark = key_node.start_mark
                        problems.append(
                            f"line {mark.line + 1}, column {mark.column + 1}: duplicate key "
                            f"{_show(key_node.value)} (only the last one would be used)"
                        )
                    keys.add(ident)
                stack.extend((key_node, value_node))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    problems.sort(key=_line_number)
    return problems


def _line_number(problem: str) -> int:
    return int(problem.split(",", 1)[0].removeprefix("line "))


# --------------------------------------------------------------------------------------------
# Showing values in messages
# --------------------------------------------------------------------------------------------

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def _show(value: Any) -> str:
    """A short, YAML-flavoured rendering of a value for a problem message."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int) and value.bit_length() > 64:
        # repr() of a huge int is slow, and above 4300 digits it raises.
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return _REPR.repr(value)
    except Exception:  # e.g. a huge int nested in a list
        return f"a {type(value).__name__}"


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_hint(value: Any) -> str:
    # YAML turns unquoted 2024-01-01, yes, 1.0 or 42 into non-strings; say how to keep text.
    if isinstance(value, (bool, int, float)) or type(value).__module__ == "datetime":
        return " (put it in quotes to make it text)"
    return ""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _Missing:
    """Marks a key that is absent (distinct from an explicit null)."""


_MISSING = _Missing()


class _Validator:
    """Walks the parsed YAML once, collecting problems and building the dataclasses."""

    def __init__(self, manifest_path: Path) -> None:
        self.path = manifest_path
        self.base = manifest_path.parent
        self.problems: list[str] = []
        self.known_ids: dict[str, tuple[int, bool]] = {}  # id -> (first index, derived from file name)

    # -- helpers ------------------------------------------------------------------------------

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}" if where else message)

    def check_keys(self, mapping: Mapping, allowed: tuple[str, ...], where: str, what: str = "key") -> None:
        names = ", ".join(sorted(allowed))
        for key in mapping:
            if key not in allowed:
                self.problem(where, f"unknown {what} {_show(key)} (allowed: {names})")

    def section(self, data: Mapping, name: str) -> Mapping:
        value = data.get(name)
        if value is None:  # absent, or written as "model:" with nothing after it
            return {}
        if not isinstance(value, Mapping):
            self.problem(name, f"expected a mapping, got {_show(value)}")
            return {}
        return value

    def string(self, value: Any, where: str, *, limit: int, allow_empty: bool = True) -> str | None:
        problem = text_problem(value, limit, allow_empty=allow_empty)
        if problem:
            self.problem(where, problem)
            return None
        return value

    def existing_file(self, value: Any, where: str, what: str) -> Path | None:
        written = self.string(value, where, limit=MAX_PATH_LENGTH, allow_empty=False)
        if written is None:
            return None
        resolved = self.resolve(written, where)
        if resolved is None:
            return None
        # stat, never open: opening a FIFO waits for a writer for ever, and a device such as
        # /dev/zero never ends. Only regular files are read later.
        try:
            mode = os.stat(resolved).st_mode
        except FileNotFoundError:
            self.problem(where, f"{what} not found: {_show(written)} (resolved to {resolved})")
            return None
        except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
            self.problem(where, f"{what} cannot be read: {_show(written)} (resolved to {resolved}): "
                                f"{_short(getattr(exc, 'strerror', None) or str(exc))}")
            return None
        if not stat.S_ISREG(mode):
            self.problem(where, f"{_show(written)} (resolved to {resolved}) is not a file but {file_kind(mode)}")
            return None
        return resolved

    def resolve(self, written: str, where: str) -> Path | None:
        try:
            return (self.base / Path(written).expanduser()).resolve()
        except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, unknown ~user, loops
            self.problem(where, f"invalid path {_show(written)}: {_short(str(exc))}")
            return None

    # -- the manifest -------------------------------------------------------------------------

    def run(self, data: Any) -> tuple[list[str], Manifest | None]:
        if data is None:
            self.problem("", "the manifest is empty; expected a mapping with an 'images' list")
            return self.problems, None
        if not isinstance(data, Mapping):
            self.problem("top level", f"expected a mapping with an 'images' list, got {_show(data)}")
            return self.problems, None
        self.check_keys(data, _TOP_KEYS, "top level")

        model = self.model(self.section(data, "model"))
        attention = self.attention(self.section(data, "attention"))
        detector = self.detector(self.section(data, "detector"))
        output = self.output(self.section(data, "output"), data.get("title", _MISSING))
        images = self.images(data.get("images", _MISSING))

        if self.problems or None in (model, attention, detector, output, images):
            return self.problems, None
        manifest = Manifest(
            path=self.path, model=model, attention=attention, detector=detector, output=output, images=images
        )
        return self.problems, manifest

    def settings(self, settings_type: type, values: dict[str, Any], keys: Mapping[str, str] | None = None) -> Any:
        """Build a settings dataclass, reporting each of its problems under its manifest key."""
        try:
            return settings_type(**values)
        except SettingsError as err:
            for key, message in err.problems:
                self.problem((keys or {}).get(key, f"{err.section}.{key}"), message)
            return None

    def model(self, section: Mapping) -> ModelSettings | None:
        self.check_keys(section, _MODEL_KEYS, "model")
        before = len(self.problems)
        values = {key: section[key] for key in ("name", "input_size", "pretrained", "options") if section.get(key) is not None}
        if section.get("weights") is not None:
            weights = self.existing_file(section["weights"], "model.weights", "weights file")
            if weights is not None:
                values["weights"] = weights
        settings = self.settings(ModelSettings, values)
        return settings if len(self.problems) == before else None

    def attention(self, section: Mapping) -> AttentionSettings | None:
        self.check_keys(section, _ATTENTION_KEYS, "attention")
        values = {key: section[key] for key in ("head_fusion", "discard_ratio") if section.get(key) is not None}
        return self.settings(AttentionSettings, values)

    def detector(self, section: Mapping) -> DetectorSettings | None:
        self.check_keys(section, _DETECTOR_KEYS, "detector")
        values = {key: section[key] for key in ("threshold",) if section.get(key) is not None}
        if "name" in section:  # "name: null" can only mean "no detector"
            values["name"] = section["name"]
        return self.settings(DetectorSettings, values)

    def output(self, section: Mapping, top_title: Any) -> OutputSettings | None:
        self.check_keys(section, _OUTPUT_KEYS, "output")
        before = len(self.problems)
        values = {key: section[key] for key in ("cmap", "alpha") if section.get(key) is not None}
        if section.get("dir") is not None:
            written = self.string(section["dir"], "output.dir", limit=MAX_PATH_LENGTH, allow_empty=False)
            if written is not None:
                resolved = self.resolve(written, "output.dir")
                if resolved is not None:
                    try:
                        clash = resolved.exists() and not resolved.is_dir()
                    except (OSError, ValueError):
                        clash = False
                    if clash:
                        self.problem("output.dir", f"{_show(written)} (resolved to {resolved}) is a file, not a folder")
                    else:
                        values["dir"] = resolved
        titles = [(key, value) for key, value in (("title", top_title), ("output.title", section.get("title")))
                  if value is not _MISSING and value is not None]
        title_key = "output.title"
        if len(titles) == 2 and titles[0][1] != titles[1][1]:
            self.problem("title", "given both as 'title' and as 'output.title' with different values; keep one")
        elif titles:
            title_key, values["title"] = titles[0]
        settings = self.settings(OutputSettings, values, keys={"title": title_key})
        return settings if len(self.problems) == before else None

    # -- images -------------------------------------------------------------------------------

    def images(self, raw: Any) -> tuple[ImageEntry, ...] | None:
        if raw is _MISSING:
            self.problem("images", "missing: the manifest must list at least one image")
            return None
        if raw is None:  # "images:" with nothing after it
            raw = []
        if not isinstance(raw, list):
            self.problem("images", f"expected a list of images, got {_show(raw)}")
            return None
        if not raw:
            self.problem("images", "the list is empty; add at least one image")
            return None

        before = len(self.problems)
        drafts: list[dict[str, Any]] = []
        # Every entry whose id is known takes part in the duplicate check, even one with other
        # problems, so that all problems are reported in one run.
        for index, entry in enumerate(raw):
            draft = self.image(index, entry)
            if draft is not None:
                drafts.append(draft)
        if len(self.problems) > before:
            return None

        slugs = _unique_slugs([d["id"] for d in drafts])
        return tuple(
            ImageEntry(
                index=d["index"],
                id=d["id"],
                slug=slug,
                path=d["path"],
                title=d["title"],
                caption=d["caption"],
                kind=d["kind"],
                objects=d["objects"],
            )
            for d, slug in zip(drafts, slugs)
        )

    def image(self, index: int, entry: Any) -> dict[str, Any] | None:
        """Check one image entry; return its fields, or None if it has problems."""
        label = f"images[{index}]"
        if not isinstance(entry, Mapping):
            self.problem(label, f"expected a mapping with at least a 'path' key, got {_show(entry)}")
            return None
        before = len(self.problems)

        # The id goes into the label of every later problem, so settle it first.
        raw_id = entry.get("id")
        raw_path = entry.get("path", _MISSING)
        image_id: str | None = None
        derived = False
        id_problem = None
        if raw_id is not None:
            id_problem = text_problem(raw_id, MAX_ID_LENGTH, allow_empty=False)
            if id_problem:
                id_problem = f"id: {id_problem}"
            else:
                image_id = raw_id
        elif isinstance(raw_path, str) and raw_path.strip() and not text_problem(raw_path, MAX_PATH_LENGTH):
            stem = Path(raw_path.strip()).stem
            if len(stem) > MAX_ID_LENGTH:
                id_problem = (f"id: too long: the file name's stem, used as the id, has {len(stem)} characters, more than "
                              f"the limit of {MAX_ID_LENGTH}; give the entry a shorter 'id'")
            elif stem:
                image_id, derived = stem, True
        if image_id is not None:
            label = f"images[{index}] (id {_show(image_id)})"
        if id_problem:
            self.problem(label, id_problem)
        if image_id is not None:
            self.check_duplicate(index, image_id, derived, label)
        self.check_keys(entry, _IMAGE_KEYS, label)

        path = None
        if raw_path is _MISSING or raw_path is None:
            self.problem(label, "missing required key 'path'")
        else:
            path = self.existing_file(raw_path, f"{label}: path", "image file")

        title = image_id or ""
        if entry.get("title") is not None:
            title = self.string(entry["title"], f"{label}: title", limit=MAX_TITLE_LENGTH)
        caption = ""
        if entry.get("caption") is not None:
            caption = self.string(entry["caption"], f"{label}: caption", limit=MAX_CAPTION_LENGTH)
        kind = "single"
        if entry.get("kind") is not None:
            kind = entry["kind"]
            if kind not in IMAGE_KINDS:
                self.problem(label, f"kind: expected one of {', '.join(IMAGE_KINDS)}, got {_show(kind)}")
        objects = self.objects(entry.get("objects"), label)

        if len(self.problems) > before or image_id is None:
            return None
        return dict(
            index=index,
            id=image_id,
            path=path,
            title=title,
            caption=caption,
            kind=kind,
            objects=objects,
        )

    def check_duplicate(self, index: int, image_id: str, derived: bool, label: str) -> None:
        if image_id not in self.known_ids:
            self.known_ids[image_id] = (index, derived)
            return
        other, other_derived = self.known_ids[image_id]
        hint = " (taken from the file name; give the entries different 'id's)" if derived or other_derived else ""
        self.problem(label, f"id: duplicate id {_show(image_id)}, also used by images[{other}]{hint}")

    def objects(self, raw: Any, label: str) -> tuple[ObjectBox, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.problem(label, f"objects: expected a list of {{label, box}} mappings, got {_show(raw)}")
            return ()
        if len(raw) > MAX_OBJECTS:
            self.problem(label, f"objects: {len(raw)} objects, more than the limit of {MAX_OBJECTS} per image")
            return ()
        boxes = []
        for number, item in enumerate(raw):
            where = f"objects[{number}]"
            if not isinstance(item, Mapping):
                self.problem(label, f"{where}: expected a mapping with 'label' and 'box', got {_show(item)}")
                continue
            self.check_keys(item, _OBJECT_KEYS, f"{label}: {where}")
            name = None
            if item.get("label") is None:
                self.problem(label, f"{where}: missing required key 'label'")
            else:
                name = self.string(item["label"], f"{label}: {where}.label", limit=MAX_LABEL_LENGTH, allow_empty=False)
            coords = self.box(item.get("box", _MISSING), f"{label}: {where}.box")
            if name is not None and coords is not None:
                boxes.append(ObjectBox(name, *coords))
        return tuple(boxes)

    def box(self, raw: Any, where: str) -> tuple[float, float, float, float] | None:
        if raw is _MISSING or raw is None:
            self.problem(where, "missing: expected [x0, y0, x1, y1] in pixels")
            return None
        if not isinstance(raw, list) or len(raw) != 4:
            self.problem(where, f"expected a list of 4 numbers [x0, y0, x1, y1], got {_show(raw)}")
            return None
        coords = []
        for name, value in zip(("x0", "y0", "x1", "y1"), raw):
            if not _is_number(value):
                self.problem(where, f"{name} must be a number, got {_show(value)}")
                continue
            number = _finite(value)
            if number is None:
                self.problem(where, f"{name} must be a finite number, got {_show(value)}")
            elif number < 0:
                self.problem(where, f"{name} must not be negative, got {_show(value)}")
            else:
                coords.append(number)
        if len(coords) != 4:
            return None
        x0, y0, x1, y1 = coords
        ok = True
        for low_name, low, high_name, high, extent in (("x0", x0, "x1", x1, "width"), ("y0", y0, "y1", y1, "height")):
            if high < low:
                self.problem(where, f"{high_name} ({_num(high)}) must be greater than {low_name} ({_num(low)})")
                ok = False
            elif high == low:
                self.problem(
                    where, f"{high_name} ({_num(high)}) must be greater than {low_name} ({_num(low)}): the box has zero {extent}"
                )
                ok = False
        return (x0, y0, x1, y1) if ok else None


def _finite(value: int | float) -> float | None:
    """``value`` as a float, or None for inf, NaN or an int too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _num(value: float) -> str:
    # 40.0 reads better as 40 in a message about pixel coordinates.
    return f"{value:g}" if value != int(value) else str(int(value))


def _is_option_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


_COLORMAPS: frozenset[str] | None = None


def _unknown_colormap(cmap: str) -> str | None:
    """The problem with a colour-map name matplotlib does not know (with close matches), or None."""
    known = _colormap_names()
    if known is None or cmap in known:
        return None
    close = difflib.get_close_matches(cmap, sorted(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown matplotlib colour map {_show(cmap)}{hint}"


def _colormap_names() -> frozenset[str] | None:
    """Names matplotlib knows, or None if matplotlib cannot be imported (checked later then)."""
    global _COLORMAPS
    if _COLORMAPS is None:
        try:
            import matplotlib  # deferred: importing it costs ~0.2 s and most runs keep the default
        except Exception:
            return None
        _COLORMAPS = frozenset(matplotlib.colormaps)
    return _COLORMAPS
