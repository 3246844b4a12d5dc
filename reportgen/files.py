"""Opening input files (manifest, images, weights to hash) as regular files only.

A path is opened without blocking (a FIFO would otherwise wait for a writer for ever) and
checked on the open descriptor, so the file checked is the file then read.
"""

from __future__ import annotations

import errno
import os
import stat


class NotRegularFile(OSError):
    """The path is a FIFO, device or socket (``kind`` says which, in words)."""

    def __init__(self, path, kind: str):
        super().__init__(errno.EINVAL, "not a regular file", str(path))
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path) -> tuple[int, os.stat_result]:
    """A descriptor open for reading on the regular file ``path``, and its stat; the caller closes it.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        NotRegularFile: a FIFO, device or socket.
        OSError: the file cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(str(path))
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(path, file_kind(info.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, info
