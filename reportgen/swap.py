"""Replacing a site folder safely: the lock per output folder, the staging folder, the swap, and
what killed builds leave behind.

Beside an output folder ``NAME`` (in its parent) a build uses:

- ``.NAME.lock``: the lock file. One build at a time holds an exclusive ``flock`` on it (the
  kernel lets go when the process ends, however it ends); it holds that build's process id.
- ``.NAME.building-PID``: the staging folder of build PID. It carries the marker file from its
  creation, so an unfinished one is recognisably reportgen's, and the status file once complete
  (the build writes it last).
- ``.NAME.old-PID``: the previous site while the two-rename swap runs (only where the atomic
  exchange is not available).

The output path always holds a complete site, the previous one or the new one: on Linux the swap
is one atomic ``renameat2(RENAME_EXCHANGE)``. Where that is not available (another system, or a
file system without it) the swap is two renames, and a build killed between them leaves no site at
the output path but a complete one beside it, which the next build puts back before anything
else. Only folders carrying the marker (or empty ones) are ever deleted, their marker last, so a
deletion cut short is finished by the next build and a user's folder of a similar name is left
alone.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from reportgen import outdir
from reportgen.cache import STATUS_FILE
from reportgen.errors import OutputBusyError, ReportgenError

MARKER = ".reportgen-site"
MARKER_TEXT = "This folder was written by reportgen and is replaced by each build.\n"
_BUILDING, _OLD = "building", "old"


# --- the lock -------------------------------------------------------------------------------


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


class OutputLock:
    """An exclusive lock on one output folder, taken by :meth:`acquire`, let go by :meth:`release`.

    The holder deletes the lock file when it lets go, so nothing stays beside the site. That is
    safe: a build that has opened the file and then obtains the lock checks that the file it locked
    is still the one at the path (same device and inode); if the holder deleted it meanwhile, it
    opens the path again and waits on that file instead. So two builds never hold locks on
    different files at once.
    """

    def __init__(self, output: Path):
        self.output = output
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None,
                warnings: list[str] | None = None) -> OutputLock:
        """Take the lock, waiting for another build that holds it (or, without ``wait``, raising
        :class:`OutputBusyError` naming it). ``on_wait`` gets a message once if the build has to
        wait. Where locks are not available (no ``fcntl``, or a file system without ``flock``) the
        build goes on unlocked, with a line in ``warnings`` for the latter."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return self
        # An OSError here (read-only, no permission, a file in the way) is the build's to report.
        self.output.parent.mkdir(parents=True, exist_ok=True)
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    if not wait:
                        raise OutputBusyError(
                            f"{self.output}: another build ({holder}) is writing this output folder; "
                            "run again when it has finished, or without --no-wait to wait for it."
                        ) from None
                    if on_wait and not told:
                        on_wait(f"waiting for another build ({holder}) to finish writing {self.output}.")
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # e.g. NFS without lockd
                    if warnings is not None:
                        warnings.append(f"{self.path}: could not lock it ({err.strerror}); a second build into "
                                        f"{self.output} at the same time would not wait for this one.")
                    return self
                raise ReportgenError(f"{self.path}: could not lock it ({err.strerror or err})") from None
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder deleted the file we waited on: wait on the current one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the id only names the holder in other builds' messages
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (deleting the lock file first, while it is still ours)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # left in place it does no harm: the next build locks and reuses it
        os.close(self._fd)  # closing lets go of the flock
        self._fd = None


def _holder(fd: int) -> str:
    """``process PID`` of the lock's holder, from the lock file (which it writes just after taking it)."""
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"process {text}"
        time.sleep(0.01)
    return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


# --- leftovers of killed builds ----------------------------------------------------------------


def _leftovers(output: Path) -> list[tuple[str, int, Path]]:
    """(kind, process id, path) of every ``.NAME.building-PID`` / ``.NAME.old-PID`` folder beside ``output``."""
    found = []
    try:
        entries = list(os.scandir(output.parent))
    except OSError:
        return found
    for entry in entries:
        for kind in (_BUILDING, _OLD):
            prefix = f".{output.name}.{kind}-"
            pid = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and pid.isdigit() and entry.is_dir(follow_symlinks=False):
                found.append((kind, int(pid), Path(entry.path)))
    return found


def _has_file(folder: Path, name: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(folder / name).st_mode)
    except OSError:
        return False


def is_ours(folder: Path) -> bool:
    """Whether ``folder`` carries reportgen's marker file."""
    return _has_file(folder, MARKER)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a whole site: the marker and the status file (written last)."""
    return is_ours(folder) and _has_file(folder, STATUS_FILE)


def restore_output(output: Path, locked: bool) -> Path | None:
    """Put back the site a build killed in the middle of a two-rename swap left beside ``output``.

    Only when nothing is at the output path. The previous site (``.NAME.old-PID``) comes first,
    since the build that moved it aside never finished; else a complete staging folder. Holding
    the output's lock, no other build can be in its swap, so any such folder is a killed build's
    (whatever process now has its id); without the lock, only folders of ended processes are
    taken. Returns the folder put back, or ``None``.
    """
    if os.path.lexists(output):
        return None
    candidates = [(kind == _OLD, os.lstat(path).st_ctime_ns, path)
                  for kind, pid, path in _leftovers(output)
                  if is_complete(path) and (locked or not _running(pid))]
    if not candidates:
        return None
    source = max(candidates)[2]
    os.rename(source, output)
    return source


def recover(output: Path, locked: bool) -> Path | None:
    """What a build does first: put back a site a killed swap left beside ``output``
    (:func:`restore_output`, whose result it returns), then delete the leftovers."""
    restored = restore_output(output, locked)
    remove_leftovers(output)
    return restored


def remove_leftovers(output: Path) -> None:
    """Delete what killed builds left beside ``output``: folders of ended processes that carry the
    marker, or are empty. Anything else with such a name is not reportgen's and is left alone."""
    for _kind, pid, path in _leftovers(output):
        if _running(pid):
            continue
        if is_ours(path):
            remove_tree(path)
        else:
            try:
                path.rmdir()  # only succeeds when empty: killed between making it and marking it
            except OSError:
                pass


def _running(pid: int) -> bool:
    """Whether a process with this id exists (the folders of a running build are left alone)."""
    if pid == os.getpid():
        return False  # our own leftover from an earlier build in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_tree(folder: Path) -> None:
    """Delete a folder of ours: the status file first and the marker last, so a deletion cut short
    never looks like a complete site and is still recognisably ours (the next build finishes it).
    Errors are ignored; what is left is removed by the next build."""
    try:
        with os.scandir(folder) as entries:
            children = sorted((e for e in entries if e.name != MARKER), key=lambda e: e.name != STATUS_FILE)
    except OSError:
        return
    for done, entry in enumerate(children, 1):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
        if done == 2:  # the status file and one more entry gone
            _checkpoint("while-removing")
    for path in (folder / MARKER, folder):
        try:
            os.rmdir(path) if path == folder else os.unlink(path)
        except OSError:
            pass


# --- staging and swap ------------------------------------------------------------------------


def make_staging(output: Path) -> Path:
    """A new, marked staging folder beside ``output`` for this process."""
    staging = output.parent / f".{output.name}.{_BUILDING}-{os.getpid()}"
    output.parent.mkdir(parents=True, exist_ok=True)
    _clear_own(staging)
    staging.mkdir()
    outdir.write_text(staging, MARKER, MARKER_TEXT)
    return staging


def _clear_own(path: Path) -> None:
    """Remove our own leftover at ``path`` (from an earlier build in this process); refuse to touch
    anything else there."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        if is_ours(path):
            remove_tree(path)
            return
        try:
            path.rmdir()
            return
        except OSError:
            pass
    raise ReportgenError(f"{path}: is in the way of this build and was not made by reportgen; move it elsewhere.")


def swap_in(staging: Path, output: Path) -> None:
    """Make the complete ``staging`` folder the site at ``output``, and delete the previous site."""
    _checkpoint("before-swap")
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    if _exchange(staging, output):
        _checkpoint("after-swap")
        remove_tree(staging)  # now the previous site
        return
    old = output.parent / f".{output.name}.{_OLD}-{os.getpid()}"
    _clear_own(old)
    os.rename(output, old)
    try:
        _checkpoint("after-move-aside")
        os.rename(staging, output)
    except BaseException:  # Ctrl-C or an error between the renames: the previous site goes back
        if not os.path.lexists(output):
            os.rename(old, output)
        raise
    _checkpoint("after-swap")
    remove_tree(old)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2():
    """glibc's (or musl's) ``renameat2``, or ``None`` where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step. ``False`` (nothing done) where the system or the file
    system cannot; ``REPORTGEN_TEST_NO_EXCHANGE=1`` forces that, so tests reach the fallback."""
    renameat2 = _renameat2()
    if renameat2 is None or os.environ.get("REPORTGEN_TEST_NO_EXCHANGE"):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the kernel or the file system does not do exchanges
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _checkpoint(step: str) -> None:
    """Test hook: ``REPORTGEN_TEST_KILL_AT=<step>`` kills this process at that step of the swap,
    as ``kill -9`` would, so the tests can check that every step leaves a site."""
    if os.environ.get("REPORTGEN_TEST_KILL_AT") == step:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
