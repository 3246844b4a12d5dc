"""The one way a build writes a file: inside its staging folder, never through a link.

Every page, figure, asset, reused file and status file of a build is created through
:func:`target` (or the helpers on top of it), which refuses a path that is absolute, climbs out
with ``..``, passes through a symbolic link or ends in one. Names are built from manifest slugs,
so a refusal means a bug or a staging folder someone else is writing into; either way nothing is
written outside. The functions are plain and take the staging root, so figure worker processes
(``--jobs``) use them too.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePath
from typing import BinaryIO

from reportgen.errors import ReportgenError

# A new file every time (O_EXCL after removing an old one): a file linked from the previous site
# is replaced, never written through, and a link put in its place meanwhile is not followed.
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class UnsafePathError(ReportgenError):
    """A build tried to write outside its staging folder or through a symbolic link."""


def target(root: Path, relative: str | PurePath) -> Path:
    """The path of ``relative`` inside ``root``, with its parent folders created, checked to stay inside.

    Args:
        root: the staging folder (exists).
        relative: a relative path with ``/`` separators, e.g. ``figures/cat/rollout.jpg``.

    Raises:
        UnsafePathError: if ``relative`` is empty or absolute, has a ``..`` part, or a folder on
            the way or the file itself is a symbolic link (or the file is a folder), or the
            resolved parent is not inside ``root``.
    """

    def refuse(reason: str) -> UnsafePathError:
        return UnsafePathError(f"{root}: refusing to write {str(relative)!r}: {reason}")

    text = str(relative)
    pure = PurePath(text)
    parts = [part for part in text.replace(os.sep, "/").split("/") if part not in ("", ".")]
    if not text or "\0" in text:
        raise refuse("not a file name")
    if pure.is_absolute() or pure.anchor or text.startswith(("/", os.sep)):
        raise refuse("an absolute path")
    if ".." in parts:
        raise refuse("it leads out of the folder ('..')")
    if not parts:
        raise refuse("not a file name")
    folder = root
    for part in parts[:-1]:
        folder = folder / part
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by another writer: checked below
                pass
            mode = os.lstat(folder).st_mode
        if not stat.S_ISDIR(mode):
            raise refuse(f"{folder} is {'a symbolic link' if stat.S_ISLNK(mode) else 'not a folder'}")
    real_root, real_folder = root.resolve(), folder.resolve()
    if real_folder != real_root and real_root not in real_folder.parents:
        raise refuse(f"{folder} lies outside the folder")
    path = folder / parts[-1]
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(mode):
        raise refuse("the file is a symbolic link")
    if stat.S_ISDIR(mode):
        raise refuse("it is a folder")
    return path


def _fresh(root: Path, relative: str | PurePath) -> Path:
    path = target(root, relative)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return path


def open_new(root: Path, relative: str | PurePath) -> BinaryIO:
    """A new file at ``relative`` inside ``root`` (see :func:`target`; an old one is replaced), open for writing."""
    return os.fdopen(os.open(_fresh(root, relative), _OPEN_FLAGS, 0o666), "wb")


def write_bytes(root: Path, relative: str | PurePath, data: bytes) -> None:
    """Write ``data`` to ``relative`` inside ``root`` (see :func:`target`)."""
    with open_new(root, relative) as file:
        file.write(data)


def write_text(root: Path, relative: str | PurePath, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line ends to ``relative`` inside ``root``."""
    write_bytes(root, relative, text.encode("utf-8"))


def link_or_copy(source: Path, root: Path, relative: str | PurePath) -> None:
    """Put the file ``source`` at ``relative`` inside ``root``: a hard link, or a copy where links
    are not possible. ``source`` is not followed if it is a symbolic link (callers check it)."""
    # The old site is deleted after the swap; a hard link keeps the bytes without copying them.
    path = _fresh(root, relative)
    try:
        os.link(source, path, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, path, follow_symlinks=False)
