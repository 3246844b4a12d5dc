"""reportgen's own error types.

Every error a user can cause (bad manifest, missing model, unreadable image) is raised as a
:class:`ReportgenError`; the command line prints its message and exits non-zero, never a traceback.
"""

from __future__ import annotations

import errno


class ReportgenError(Exception):
    """Base class for errors that are reported to the user as a plain message."""


class ManifestError(ReportgenError):
    """The manifest is missing, unreadable or invalid.

    Args:
        path: the manifest file.
        problems: one line per problem, each naming the entry and key.
    """

    def __init__(self, path, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(f"{path}: {count} problem{'s' if count != 1 else ''} in the manifest:\n{lines}")


class ModelLoadError(ReportgenError):
    """A model (ViT or detector) could not be created or its weights could not be loaded."""


class ModelSettingsError(ReportgenError, ValueError):
    """A setting does not fit the loaded model (a rule that needs the model, such as its depth).

    A ``ValueError`` too, as every bad setting is for the Python API."""


class CaptureError(ReportgenError):
    """Attention could not be captured from every layer of the model."""


class ImageError(ReportgenError):
    """An image could not be read or used."""


class OutputError(ReportgenError):
    """The output folder cannot be written (read-only, no permission, disk full, bad path)."""

    @classmethod
    def from_os_error(cls, err: OSError, output) -> "OutputError":
        """One sentence naming the output folder, the path that failed and the cause."""
        cause = _OS_ERROR_CAUSES.get(err.errno, err.strerror or str(err))
        where = "" if err.filename in (None, str(output)) else f" ({err.filename})"
        return cls(f"{output}: cannot write the site{where}: {cause}. The previous site (if any) is unchanged.")


_OS_ERROR_CAUSES = {
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only; choose another output folder with --output",
    errno.EACCES: "permission denied; choose a folder you can write to with --output",
    errno.EPERM: "operation not permitted; choose a folder you can write to with --output",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter --output",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another --output",
    errno.EEXIST: "a part of the path is a file, not a folder; choose another --output",
    errno.EIO: "input/output error (the disk may be failing)",
}


class OutputBusyError(ReportgenError):
    """Another build holds the output folder's lock, and this one was told not to wait."""
