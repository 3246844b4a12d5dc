"""Problem messages: how values are shown, the wording of the shared rules, and the one
translation of pydantic's validation errors into messages located by file entry and key.

A rule (see :mod:`reportgen.config.rules`) raises its problem with :func:`problem` (or several
with :func:`problems`) in its final wording; :func:`locate` only adds where it is, and words the
few errors pydantic itself raises (unknown and missing keys).
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from reportgen.config.bounds import MAX_ID_LENGTH, MAX_PATH_LENGTH

#: The error type of every problem a rule raises: its message is final.
RULE_ERROR = "reportgen"

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4


def show(value: Any) -> str:
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


def short(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_hint(value: Any) -> str:
    # YAML turns unquoted 2024-01-01, yes, 1.0 or 42 into non-strings; say how to keep text.
    if isinstance(value, (bool, int, float)) or type(value).__module__ == "datetime":
        return " (put it in quotes to make it text)"
    return ""


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite(value: int | float) -> float | None:
    """``value`` as a float, or None for inf, NaN or an int too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def text_problem(value: Any, limit: int, *, allow_empty: bool = True) -> str | None:
    """What is wrong with ``value`` as a piece of text of at most ``limit`` characters, or None.

    Text must be a ``str`` without lone surrogates: those come from ``\\ud800``-style escapes or
    from file names that are not UTF-8, and could not be written to a UTF-8 page later.
    """
    if not isinstance(value, str):
        return f"expected a string, got {show(value)}{_quote_hint(value)}"
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


def number_problem(value: Any, *, low: float, high: float, low_ok: bool, high_ok: bool) -> str | None:
    """What is wrong with ``value`` as a finite number between ``low`` and ``high``, or None."""
    if not is_number(value):
        return f"expected a number, got {show(value)}"
    number = finite(value)
    if number is None:
        return f"expected a finite number, got {show(value)}"
    above = number >= low if low_ok else number > low
    below = number <= high if high_ok else number < high
    if not (above and below):
        rule = f"{low:g} {'<=' if low_ok else '<'} value {'<=' if high_ok else '<'} {high:g}"
        return f"must satisfy {rule}, got {show(value)}"
    return None


def image_id(entry: Any) -> tuple[str | None, bool]:
    """The id an image entry goes by, and whether it comes from the file name.

    An entry's own id if it is valid text, else the stem of its path (None if neither is usable,
    or the stem is too long to be an id): the same id names the entry in every message about it.
    """
    if not isinstance(entry, Mapping):
        return None, False
    written = entry.get("id")
    if written is not None:
        return (written, False) if text_problem(written, MAX_ID_LENGTH, allow_empty=False) is None else (None, False)
    stem = file_stem_id(entry.get("path"))
    if stem is not None and len(stem) <= MAX_ID_LENGTH:
        return stem, True
    return None, False


def file_stem_id(path: Any) -> str | None:
    """The id of an image entry that has none: its file name without the extension (None when the
    path is not usable text or has no stem)."""
    if isinstance(path, str) and path.strip() and text_problem(path, MAX_PATH_LENGTH) is None:
        return Path(path.strip()).stem or None
    return None


# --------------------------------------------------------------------------------------------
# Raising problems from rules
# --------------------------------------------------------------------------------------------


def problem(message: str) -> PydanticCustomError:
    """A rule's problem, worded in full, to raise from a validator."""
    return PydanticCustomError(RULE_ERROR, "{message}", {"message": message})


def problems(found: Sequence[tuple[tuple, str]], value: Any, title: str = "settings") -> Exception:
    """Several problems of one value at once, each at a location below it, to raise from a validator."""
    if len(found) == 1 and not found[0][0]:
        return problem(found[0][1])
    return ValidationError.from_exception_data(
        title, [{"type": problem(message), "loc": loc, "input": value} for loc, message in found]
    )


def with_problems(error: ValidationError | None, found: Iterable[tuple[tuple, str]], value: Any,
                  order: Sequence[str] = ()) -> ValidationError | None:
    """``error``'s problems together with ``found`` (location, message) ones, sorted by the
    position of their first key in ``order`` and then by list index; None if there are none."""
    line_errors = []
    for err in error.errors() if error is not None else ():
        kind = err["type"]
        if kind == RULE_ERROR:
            line_errors.append({"type": problem(err["ctx"]["message"]), "loc": err["loc"], "input": err["input"]})
        else:
            line_errors.append({key: err[key] for key in ("type", "loc", "input", "ctx") if key in err})
    line_errors += [{"type": problem(message), "loc": loc, "input": value} for loc, message in found]
    if not line_errors:
        return None

    def position(line: dict) -> tuple[int, int]:
        loc = tuple(line["loc"])
        first = order.index(loc[0]) if loc and loc[0] in order else len(order)
        return first, loc[1] if len(loc) > 1 and isinstance(loc[1], int) else -1

    return ValidationError.from_exception_data("manifest", sorted(line_errors, key=position))


# --------------------------------------------------------------------------------------------
# Locating problems
# --------------------------------------------------------------------------------------------

_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument", "invalid_key")
_MISSING = ("missing", "missing_argument", "missing_keyword_only_argument")


def locate(error: ValidationError, root: type, data: Any = None, *, document: bool = False) -> list[tuple[str, str]]:
    """Every problem of ``error`` as ``(where, message)``.

    ``where`` names the key in the manifest's own terms: ``model.input_size``,
    ``model.options.img_size``, ``images[2] (id 'cat'): objects[0].box``, ``top level``; it is
    "" for a problem of the whole value of a section validated on its own.

    Args:
        error: raised by validating ``data`` as ``root``.
        root: the settings class (a pydantic dataclass) that was validated.
        data: the value validated; image entries are named by their id from it.
        document: ``root`` is the whole manifest (whose own problems are at its "top level").
    """
    found = []
    for err in error.errors(include_url=False):
        loc, kind = tuple(err["loc"]), err["type"]
        if kind == RULE_ERROR:
            message = err["ctx"]["message"]
        elif kind in _UNKNOWN_KEY:
            key = err["input"] if kind == "invalid_key" else loc[-1]
            loc = loc[:-1]
            allowed = ", ".join(sorted(_fields(_class_at(root, loc))))
            message = f"unknown key {show(key)} (allowed: {allowed})"
        elif kind in _MISSING:
            hint = (_fields(_class_at(root, loc[:-1])).get(loc[-1]) or {}).get("missing")
            if hint:
                message = hint
            else:
                message, loc = f"missing required key {show(loc[-1])}", loc[:-1]
        else:  # a rule should have caught it; still word it plainly
            text = err["msg"]
            message = f"{text[:1].lower()}{text[1:]}, got {show(err.get('input'))}"
        found.append((_where(loc, data, document), message))
    return found


def _where(loc: tuple, data: Any, document: bool) -> str:
    if document and not loc:
        return "top level"
    if document and len(loc) >= 2 and loc[0] == "images" and isinstance(loc[1], int):
        entries = data.get("images") if isinstance(data, Mapping) else None
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        known, _derived = image_id(entry)
        head = f"images[{loc[1]}]" + (f" (id {show(known)})" if known is not None else "")
        rest = _path(loc[2:])
        return f"{head}: {rest}" if rest else head
    return _path(loc)


def _path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _fields(cls: type | None) -> dict[str, dict]:
    """The keys of a settings class, each with its ``json_schema_extra`` (e.g. a "missing" hint)."""
    found = getattr(cls, "__pydantic_fields__", None) or {}
    return {name: (info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {})
            for name, info in found.items()}


def _class_at(root: type, loc: tuple) -> type | None:
    """The settings class whose value sits at ``loc`` below ``root`` (list indexes skipped)."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        info = (getattr(cls, "__pydantic_fields__", None) or {}).get(part)
        if info is None:
            return None
        cls = _settings_class(info.annotation)
    return cls


def _settings_class(annotation: Any) -> type | None:
    if hasattr(annotation, "__pydantic_fields__"):
        return annotation
    for arg in get_args(annotation):  # Optional[...], tuple[X, ...], Annotated[...]
        found = _settings_class(arg)
        if found is not None:
            return found
    return None


class SettingsError(ValueError):
    """Settings with impossible values, each problem with the key it is about.

    Raised when settings are changed from code or the command line
    (:meth:`~reportgen.config.Manifest.with_overrides`); the command line reports each problem
    under its option.

    Attributes:
        section: "model", "attention", "detector", "output", "methods" or "options" (a build's).
        problems: ``(key, message)`` pairs; ``key`` is a field name ("input_size"), a dotted
            path below one ("options.checkpoint_path"), a list index ("[1]") or "".
    """

    def __init__(self, section: str, problems: list[tuple[str, str]]):
        self.section = section
        self.problems = list(problems)
        super().__init__("; ".join(f"{_path((section,)) + _joined(key)}: {message}" for key, message in self.problems))

    @classmethod
    def of(cls, section: str, error: ValidationError, root: type) -> SettingsError:
        """The problems of ``error``, raised by validating ``root`` on its own."""
        return cls(section, locate(error, root))


def _joined(key: str) -> str:
    return "" if not key else key if key.startswith("[") else f".{key}"
