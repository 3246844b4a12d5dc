"""What a rebuild may reuse from the previous site, like coverage.py's html status file.

The output folder holds a status file with a format number, the reportgen version, a key of
everything that changes the numbers or figures (model identity, weights hash, input size,
rollout, detector and figure settings), the model/capture description of the run, and per image
a key of its inputs (image bytes, kind, boxes, page name) with the record its page renders from.
An image whose key matches and whose figures are on disk is not recomputed; titles and captions
are not in the key, so editing them only re-renders pages. A missing, corrupt or foreign status
file is discarded (with a warning when it exists but cannot be trusted). Failed images are never
cached, so they are retried on the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import reportgen
from reportgen.hashing import file_sha256
from reportgen.manifest import ImageEntry, Manifest, ModelSettings
from reportgen.sources import IMGFOCUS_NAME, IMGFOCUS_ONNX_SHA256

log = logging.getLogger(__name__)

STATUS_FILE = ".reportgen-status.json"
STATUS_FORMAT = 2  # 2: one explorer sprite sheet per image
FIGURE_SUFFIXES = (".png", ".jpg")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(settings: ModelSettings) -> dict[str, Any]:
    """What identifies the model's numbers without loading it (the weights file is hashed)."""
    if settings.name == IMGFOCUS_NAME:
        weights = IMGFOCUS_ONNX_SHA256
    elif settings.weights is not None and settings.weights.is_file():
        weights = file_sha256(settings.weights)
    else:
        weights = "hub" if settings.pretrained else "random"
    return {
        "name": settings.name,
        "weights": weights,
        "input_size": settings.input_size,
        "options": dict(settings.options),
    }


def settings_key(manifest: Manifest) -> str:
    """Key of everything global that changes numbers or figures."""
    return _digest(
        {
            "format": STATUS_FORMAT,
            "reportgen": reportgen.__version__,
            "model": model_identity(manifest.model),
            "attention": [manifest.attention.head_fusion, manifest.attention.discard_ratio],
            "detector": [manifest.detector.name, manifest.detector.threshold],
            "figures": [manifest.output.cmap, manifest.output.alpha],
        }
    )


def image_key(entry: ImageEntry, global_key: str) -> str:
    """Key of one image's inputs: its bytes, kind, boxes and page name, under the global key."""
    return _digest(
        {
            "global": global_key,
            "image": file_sha256(entry.path),
            "kind": entry.kind,
            "slug": entry.slug,
            "objects": [[b.label, *b.as_tuple()] for b in entry.objects],
        }
    )


@dataclass
class Status:
    """The status file's content.

    Attributes:
        settings_key: :func:`settings_key` of the build that wrote it.
        model_run: model, capture and versions description of that build.
        entries: per slug, ``{"key": image key, "record": page record}``.
    """

    settings_key: str
    model_run: dict[str, Any] | None = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": STATUS_FORMAT,
                "reportgen": reportgen.__version__,
                "settings_key": self.settings_key,
                "model_run": self.model_run,
                "entries": self.entries,
            },
            sort_keys=True,
            separators=(",", ":"),  # compact: Python's C encoder (indented JSON is ~3x slower to write)
        )


def read_status(output: Path, current_key: str, warnings: list[str]) -> Status | None:
    """The previous build's status, if it exists and can be trusted for ``current_key``."""
    path = output / STATUS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != STATUS_FORMAT:
            raise ValueError(f"unknown format {data.get('format') if isinstance(data, dict) else data!r}")
        if data.get("reportgen") != reportgen.__version__:
            raise ValueError(f"written by reportgen {data.get('reportgen')}, this is {reportgen.__version__}")
        entries = data["entries"]
        if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("key"), str) and isinstance(e.get("record"), dict)
            for e in entries.values()
        ):
            raise ValueError("malformed entries")
        status = Status(settings_key=str(data["settings_key"]), model_run=data.get("model_run"), entries=entries)
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.append(f"{path}: ignoring the build cache ({err}); everything is recomputed.")
        return None
    if status.settings_key != current_key:
        log.info("settings changed since the last build: everything is recomputed")
        return None
    return status


def reuse(status: Status, entry: ImageEntry, key: str, output: Path, staging: Path) -> dict[str, Any] | None:
    """Carry an unchanged image's figures into ``staging``; its page record, or None to recompute."""
    cached = status.entries.get(entry.slug)
    if cached is None or cached["key"] != key:
        return None
    record = cached["record"]
    source = output / "figures" / entry.slug
    if not all((output / f).is_file() for f in _figure_files(record.get("figures", {}))):
        return None
    try:
        shutil.copytree(source, staging / "figures" / entry.slug, copy_function=_link_or_copy)
    except OSError:
        return None
    # Text that is not part of the key comes from the manifest as it is now.
    return {**record, "id": entry.id, "title": entry.title, "caption": entry.caption, "source_name": entry.path.name}


def reuse_file(output: Path, staging: Path, relative: str) -> bool:
    """Carry one file of the previous site into ``staging`` (for a file that depends only on
    settings in the key); False if it is not there."""
    source = output / relative
    if not source.is_file():
        return False
    try:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(str(source), str(staging / relative))
    except OSError:
        return False
    return True


def _figure_files(figures: dict[str, Any]) -> list[str]:
    files: list[str] = []
    for value in figures.values():
        if isinstance(value, str) and value.endswith(FIGURE_SUFFIXES):
            files.append(value)
        elif isinstance(value, dict):
            files.extend(_figure_files(value))
    return files


def _link_or_copy(src: str, dst: str) -> None:
    # The old site is deleted after the swap; a hard link keeps the bytes without copying them.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
