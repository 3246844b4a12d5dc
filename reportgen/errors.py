"""reportgen's own error types.

Every error a user can cause (bad manifest, missing model, unreadable image) is raised as a
:class:`ReportgenError`; the command line prints its message and exits non-zero, never a traceback.
"""

from __future__ import annotations


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


class CaptureError(ReportgenError):
    """Attention could not be captured from every layer of the model."""


class ImageError(ReportgenError):
    """An image could not be read or used."""


class OutputBusyError(ReportgenError):
    """Another build holds the output folder's lock, and this one was told not to wait."""
