"""The rules a setting's value must follow, declared on the field they constrain::

    discard_ratio: Annotated[float, Number(ge=0, lt=1)] = 0.0

Each rule is the one place its check and its message live; the manifest, the command line and
code building settings all go through it. A rule raises its problem in final wording (see
:func:`reportgen.config.messages.problem`); paths are resolved against the manifest's folder when
the validation context holds it (``{"base": folder}``), and taken as given otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic_core import PydanticCustomError, core_schema

from reportgen.colourmaps import carried
from reportgen.config.bounds import MAX_NAME_LENGTH, MAX_PATH_LENGTH
from reportgen.config.messages import (
    finite,
    is_number,
    number_problem,
    problem,
    problems,
    short,
    show,
    text_problem,
)
from reportgen.files import file_kind


@dataclass(frozen=True)
class _Rule:
    """A check run on the raw value before the field's type; ``plain`` rules return the final value."""

    plain = False

    def check(self, value: Any, base: Path | None) -> Any:
        raise NotImplementedError

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def validate(value: Any, info: core_schema.ValidationInfo) -> Any:
            return self.check(value, (info.context or {}).get("base"))

        if self.plain:
            return core_schema.with_info_plain_validator_function(validate)
        return core_schema.with_info_before_validator_function(validate, handler(source))


@dataclass(frozen=True)
class Text(_Rule):
    """Text of at most ``limit`` characters (and not blank unless ``empty``)."""

    limit: int
    empty: bool = True

    def check(self, value: Any, base: Path | None) -> str:
        found = text_problem(value, self.limit, allow_empty=self.empty)
        if found:
            raise problem(found)
        return value


@dataclass(frozen=True)
class Number(_Rule):
    """A finite number within bounds (``ge``/``gt`` below, ``le``/``lt`` above); a float."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: Any, base: Path | None) -> float:
        low = next((b for b in (self.ge, self.gt) if b is not None), -math.inf)
        high = next((b for b in (self.le, self.lt) if b is not None), math.inf)
        found = number_problem(value, low=low, high=high, low_ok=self.ge is not None, high_ok=self.le is not None)
        if found:
            raise problem(found)
        return float(value)


@dataclass(frozen=True)
class Count(_Rule):
    """A positive whole number, at most ``most``."""

    most: int | None = None

    def check(self, value: Any, base: Path | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise problem(f"expected a positive integer, got {show(value)}")
        if self.most is not None and value > self.most:
            raise problem(f"{show(value)} is too large (at most {self.most})")
        return value


@dataclass(frozen=True)
class Flag(_Rule):
    """true or false (not 1, not "yes" in quotes)."""

    def check(self, value: Any, base: Path | None) -> bool:
        if not isinstance(value, bool):
            raise problem(f"expected true or false, got {show(value)}")
        return value


@dataclass(frozen=True)
class FlagOrIds(_Rule):
    """true, false, or a list of image ids (each non-blank text of at most ``limit`` characters,
    each once): a tuple of them. Whether the ids name images is a rule across the manifest
    (:func:`reportgen.config.schema.unknown_image_ids`)."""

    plain = True
    limit: int = 200

    def check(self, value: Any, base: Path | None) -> bool | tuple[str, ...]:
        if isinstance(value, bool):
            return value
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not value:
            raise problem(f"expected true, false or a list of image ids, got {show(value)}")
        for index, one in enumerate(value):
            found = text_problem(one, self.limit, allow_empty=False)
            if found:
                raise problem(f"entry {index + 1}: {found}")
            if one in value[:index]:
                raise problem(f"entry {index + 1}: the id {show(one)} is listed twice")
        return tuple(value)


@dataclass(frozen=True)
class OneOf(_Rule):
    """One of a fixed set of words."""

    choices: tuple[str, ...]

    def check(self, value: Any, base: Path | None) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise problem(f"expected one of {', '.join(self.choices)}, got {show(value)}")
        return value


@dataclass(frozen=True)
class ClassTargets:
    """The classes a classifier's gradient maps explain, in each image: the listed ``classes``
    (indices or names, the same for every image), or else its ``top`` predicted classes.

    Attributes:
        classes: class indices or names, in the order given; empty for the top predictions.
        top: how many of each image's top predictions (used when ``classes`` is empty).
    """

    classes: tuple[int | str, ...] = ()
    top: int = 1

    @property
    def count(self) -> int:
        """How many targets each image gets."""
        return len(self.classes) or self.top

    def as_written(self) -> list[int | str] | str:
        """As a manifest writes it: a list of classes, or ``top-k``."""
        return list(self.classes) if self.classes else f"top-{self.top}"


@dataclass(frozen=True)
class ClassChoices(_Rule):
    """:class:`ClassTargets` from one class (its index, an integer >= 0 also written as digits, or
    its name), a list of them, or ``top-k``. Whether the model has those classes is known only once
    it is loaded (checked there)."""

    plain = True
    most: int = 10
    name_chars: int = 200

    def check(self, value: Any, base: Path | None) -> ClassTargets:
        if isinstance(value, ClassTargets):
            return value  # already checked (settings merged with command-line overrides)
        if isinstance(value, str) and (top := re.fullmatch(r"\s*top-(\d+)\s*", value)):
            k = int(top.group(1))
            if not 1 <= k <= self.most:
                raise problem(f"top-k takes k from 1 to {self.most}, got {show(value)}")
            return ClassTargets(top=k)
        if not isinstance(value, (list, tuple)):
            return ClassTargets((self._one(value),))
        if not value:
            raise problem("the list is empty; name at least one class, or leave the setting out for each image's top-1")
        if len(value) > self.most:
            raise problem(f"{len(value)} classes; at most {self.most} (each costs one backward pass per image)")
        found, classes = [], []
        for index, item in enumerate(value):
            if isinstance(item, str) and re.fullmatch(r"\s*top-\d+\s*", item):
                found.append(((index,), f"{show(item)}: top-k stands alone, not in a list of classes"))
                continue
            try:
                choice = self._one(item)
            except PydanticCustomError as err:
                found.append(((index,), err.context["message"]))
                continue
            if choice in classes:
                found.append(((index,), f"{show(item)} is listed more than once"))
            classes.append(choice)
        if found:
            raise problems(found, value)
        return ClassTargets(tuple(classes))

    def _one(self, value: Any) -> int | str:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            value = int(value)  # the command line gives text: "-1" is the integer it reads as
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise problem(f"expected a class index (0 or more), a class name, a list of them or top-k, got {show(value)}")
            return value
        if not isinstance(value, str) or not value.strip():
            raise problem(f"expected a class index (0 or more), a class name, a list of them or top-k, got {show(value)}")
        text = value.strip()
        if len(text) > self.name_chars:
            raise problem(f"a class name of at most {self.name_chars} characters, got {len(text)}")
        return text


@dataclass(frozen=True)
class Pattern(_Rule):
    """Text matching ``pattern`` in full; ``described`` says what is accepted, ``hints`` why
    some values that look plausible are not."""

    pattern: str
    described: str
    hints: tuple[tuple[str, str], ...] = ()

    def check(self, value: Any, base: Path | None) -> str:
        if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
            hint = dict(self.hints).get(value) if isinstance(value, str) else None
            raise problem(f"expected {self.described}, got {show(value)}" + (f" ({hint})" if hint else ""))
        return value


def _written_path(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    found = text_problem(value, MAX_PATH_LENGTH, allow_empty=False)
    if found:
        raise problem(found)
    return value


def _resolve(written: str, base: Path) -> Path:
    try:
        return (base / Path(written).expanduser()).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, unknown ~user, loops
        raise problem(f"invalid path {show(written)}: {short(str(exc))}") from None


@dataclass(frozen=True)
class File(_Rule):
    """A path to an existing regular file (checked when reading a manifest, where it is
    resolved against the manifest's folder); ``what`` names it in messages."""

    what: str

    def check(self, value: Any, base: Path | None) -> Path:
        written = _written_path(value)
        if base is None:
            return Path(written)
        resolved = _resolve(written, base)
        # stat, never open: opening a FIFO waits for a writer for ever, and a device such as
        # /dev/zero never ends. Only regular files are read later.
        try:
            mode = os.stat(resolved).st_mode
        except FileNotFoundError:
            raise problem(f"{self.what} not found: {show(written)} (resolved to {resolved})") from None
        except (OSError, ValueError) as exc:  # e.g. a name too long for the file system
            raise problem(f"{self.what} cannot be read: {show(written)} (resolved to {resolved}): "
                          f"{short(getattr(exc, 'strerror', None) or str(exc))}") from None
        if not stat.S_ISREG(mode):
            raise problem(f"{show(written)} (resolved to {resolved}) is not a file but {file_kind(mode)}")
        return resolved


@dataclass(frozen=True)
class Folder(_Rule):
    """A path to a folder, which need not exist yet but must not be a file."""

    def check(self, value: Any, base: Path | None) -> Path:
        written = _written_path(value)
        if base is None:
            return Path(written)
        resolved = _resolve(written, base)
        try:
            clash = resolved.exists() and not resolved.is_dir()
        except (OSError, ValueError):
            clash = False
        if clash:
            raise problem(f"{show(written)} (resolved to {resolved}) is a file, not a folder")
        return resolved


#: Prefix of a Hugging Face transformers model: ``hf:ORG/NAME`` on the hub, or ``hf:PATH``.
HF_PREFIX = "hf:"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_like_folder(written: str) -> bool:
    """Whether a model name is written as a path (timm names and hub ids never start with ``.``,
    ``/`` or ``~``, and timm names hold no ``/``)."""
    return written.startswith((".", "/", "~")) or "\\" in written


@dataclass(frozen=True)
class ModelName(_Rule):
    """A model: a timm name, ``hf:ORG/NAME`` (a transformers model on the Hugging Face hub), or a
    local folder written by transformers' ``save_pretrained`` (a path with a ``/``, or ``hf:PATH``).

    A folder must hold a ``config.json``; it is resolved against the manifest's folder (or the
    current folder) and returned as an absolute path, so the name says which files are read.
    """

    def check(self, value: Any, base: Path | None) -> str:
        found = text_problem(value, MAX_PATH_LENGTH, allow_empty=False)
        if found:
            raise problem(found)
        rest = value[len(HF_PREFIX):] if value.startswith(HF_PREFIX) else None
        if rest is not None and not looks_like_folder(rest):
            if len(rest) > MAX_NAME_LENGTH or not _HUB_ID.fullmatch(rest) or ".." in rest or "--" in rest:
                raise problem(
                    f"expected a Hugging Face hub model after {HF_PREFIX!r} (ORG/NAME, e.g. hf:google/vit-base-patch16-224) "
                    f"or the path of a local folder (hf:./my-model), got {show(value)}"
                )
            return value
        written = rest if rest is not None else value
        if rest is None and "/" not in written and not looks_like_folder(written):
            if len(value) > MAX_NAME_LENGTH:
                raise problem(text_problem(value, MAX_NAME_LENGTH) or f"at most {MAX_NAME_LENGTH} characters")
            return value  # a timm name (or the offline model), checked when it is built
        folder = _resolve(written, base if base is not None else Path.cwd())
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise problem(
                f"{show(written)} (resolved to {folder}) {what}; a model given as a path must be a folder "
                "written by transformers' save_pretrained (for a hub model write hf:ORG/NAME)"
            )
        if not (folder / "config.json").is_file():
            raise problem(
                f"{show(written)} (resolved to {folder}) has no config.json, so it is not a folder "
                "written by transformers' save_pretrained"
            )
        return str(folder)


@dataclass(frozen=True)
class Items(_Rule):
    """A list (``shape`` says of what); ``empty``, if given, is the problem with an empty one;
    at most ``most`` items, ``too_many`` the problem beyond (formatted with ``count`` and ``most``)."""

    shape: str
    empty: str | None = None
    most: int | None = None
    too_many: str = ""

    def check(self, value: Any, base: Path | None) -> Any:
        if value is None:  # "images:" with nothing after it
            value = []
        if not isinstance(value, list):
            raise problem(f"expected {self.shape}, got {show(value)}")
        if self.empty is not None and not value:
            raise problem(self.empty)
        if self.most is not None and len(value) > self.most:
            raise problem(self.too_many.format(count=len(value), most=self.most))
        return value


@dataclass(frozen=True)
class Box(_Rule):
    """``[x0, y0, x1, y1]``: four finite, non-negative pixel coordinates with x0 < x1, y0 < y1."""

    plain = True

    def check(self, value: Any, base: Path | None) -> tuple[float, float, float, float]:
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise problem(f"expected a list of 4 numbers [x0, y0, x1, y1], got {show(value)}")
        found, coords = [], []
        for name, number in zip(("x0", "y0", "x1", "y1"), value):
            number_value = finite(number) if is_number(number) else None
            if not is_number(number):
                found.append(((), f"{name} must be a number, got {show(number)}"))
            elif number_value is None:
                found.append(((), f"{name} must be a finite number, got {show(number)}"))
            elif number_value < 0:
                found.append(((), f"{name} must not be negative, got {show(number)}"))
            else:
                coords.append(number_value)
        if not found:
            x0, y0, x1, y1 = coords
            for low_name, low, high_name, high, extent in (("x0", x0, "x1", x1, "width"), ("y0", y0, "y1", y1, "height")):
                if high <= low:
                    zero = f": the box has zero {extent}" if high == low else ""
                    found.append(((), f"{high_name} ({_num(high)}) must be greater than {low_name} ({_num(low)}){zero}"))
        if found:
            raise problems(found, value)
        return tuple(coords)


def _num(value: float) -> str:
    # 40.0 reads better as 40 in a message about pixel coordinates.
    return f"{value:g}" if value != int(value) else str(int(value))


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


@dataclass(frozen=True)
class Options(_Rule):
    """Extra ``timm.create_model`` keyword arguments: scalars or lists of them, none that has its
    own setting or names where weights come from; a read-only mapping (lists become tuples)."""

    plain = True

    def check(self, value: Any, base: Path | None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise problem(f"expected a mapping of timm.create_model arguments, got {show(value)}")
        result: dict[str, Any] = {}
        found: list[tuple[tuple, str]] = []
        for key, option in value.items():
            if not isinstance(key, str) or not key.isidentifier() or text_problem(key, MAX_NAME_LENGTH):
                found.append(((), f"{show(key)} is not a valid keyword argument name"))
                continue
            refused = _RESERVED_OPTIONS.get(key) or _FILE_OPTIONS.get(key)
            values = option if isinstance(option, (list, tuple)) else [option]
            texts = [text_problem(v, MAX_NAME_LENGTH) for v in values if isinstance(v, str)]
            if refused:
                found.append(((key,), refused))
            elif not all(_is_option_scalar(v) for v in values):
                found.append(((key,), f"expected a number, string, true/false, null or a list of those, got {show(option)}"))
            elif any(texts):
                found.append(((key,), next(t for t in texts if t)))
            else:
                result[key] = tuple(option) if isinstance(option, list) else option  # a tuple keeps it immutable
        if found:
            raise problems(found, value)
        return MappingProxyType(result)  # a private copy behind a read-only view


def _is_option_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return finite(value) is not None
    return value is None or isinstance(value, (str, int, bool))


@dataclass(frozen=True)
class Colormap(_Rule):
    """A matplotlib colour-map name (checked only when matplotlib can be imported)."""

    def check(self, value: Any, base: Path | None) -> str:
        found = text_problem(value, MAX_NAME_LENGTH, allow_empty=False)
        if not found and not carried(value):  # no matplotlib import for the maps reportgen carries
            known = _colormap_names()
            if known is not None and value not in known:
                close = difflib.get_close_matches(value, sorted(known), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                found = f"unknown matplotlib colour map {show(value)}{hint}"
        if found:
            raise problem(found)
        return value


_COLORMAPS: frozenset[str] | None = None


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


@dataclass(frozen=True)
class Names(_Rule):
    """Names from a registry (read when a value is checked, so a plug-in registered later counts),
    each at most once, or the word ``every`` for all of them; a tuple in the registry's order
    (pages and results show methods in that order, whatever order a list gives). ``what`` is the
    kind of name ("method")."""

    plain = True
    registry: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    what: str = "name"
    every: str = "all"

    def check(self, value: Any, base: Path | None) -> tuple[str, ...]:
        known = tuple(self.registry)
        shape = f"a list of {self.what} names or '{self.every}'"
        if value == self.every:
            return known
        if isinstance(value, str):
            raise problem(f"expected {shape}, got {show(value)} (write [{value}] for one {self.what})")
        if not isinstance(value, (list, tuple)):
            raise problem(f"expected {shape}, got {show(value)}")
        if not value:
            raise problem(f"the list is empty; name at least one {self.what}, or write {self.every}")
        found: list[tuple[tuple, str]] = []
        seen: set[str] = set()
        for index, name in enumerate(value):
            text = text_problem(name, MAX_NAME_LENGTH, allow_empty=False)
            if text:
                found.append(((index,), text))
            elif name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                alone = f" ('{self.every}' stands alone, not in a list)" if name == self.every else ""
                found.append(((index,), f"unknown {self.what} {show(name)}{hint}{alone} (known: {', '.join(known)})"))
            elif name in seen:
                found.append(((index,), f"{show(name)} is listed more than once"))
            seen.add(name)
        if found:
            raise problems(found, value)
        return tuple(name for name in known if name in value)
