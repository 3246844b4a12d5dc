"""Content hashes of files, read in chunks (weights files can be hundreds of MB), and remembered.

Every build needs the hash of each image and of a local weights file to know what changed.
:func:`file_sha256` remembers each hash, for the life of the process, with the file's size,
modification and change times and inode, and reads the file again only when one of them differs
(the change time cannot be set back by tools that restore modification times). ``--watch`` thus
reads only the files that changed, and a weights file is read once, not once per rebuild.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from reportgen.files import open_regular

# A file changed within this long may change again without its timestamps moving (they tick
# coarsely); its hash is not remembered until it has been still for longer.
RACY_NS = 2_000_000_000

_known: dict[str, tuple[tuple[int, int, int, int], str]] = {}
_lock = threading.Lock()


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of a regular file's bytes.

    Raises:
        OSError: the file cannot be read, or is not a regular file (a FIFO would block for ever,
            a device such as /dev/zero never ends); opened without blocking and checked on the
            open descriptor.
    """
    digest = hashlib.sha256()
    fd, _info = open_regular(path)
    try:
        for chunk in iter(lambda: os.read(fd, chunk_size), b""):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read only if the file is new or changed since it was hashed."""
    name = os.path.abspath(path)
    st = os.stat(name)  # before reading: a change while reading moves the stamp for next time
    stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _lock:
        known = _known.get(name)
    if known is not None and known[0] == stamp:
        return known[1]
    digest = sha256_file(Path(name))
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        with _lock:
            _known[name] = (stamp, digest)
    return digest
