"""Image ids as file names: safe on every file system and unique within a manifest."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["MAX_SLUG_LENGTH", "RESERVED_SLUGS", "slugify", "unique_slugs"]

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


def unique_slugs(ids: list[str]) -> list[str]:
    """The slugs of ``ids``, in order, made unique by numbering ("a-b", "a-b-2", ...)."""
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

