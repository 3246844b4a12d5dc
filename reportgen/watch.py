"""Watching a build's inputs: the manifest, its images, a local weights file or model folder and the templates.

``reportgen build --watch`` rebuilds whenever one of them changes, in the same process, so the
model stays loaded and torch stays imported: a rebuild after one image changed costs that image's
forward pass, figures and the pages, not the seconds a new process spends importing torch and
timm and loading the model. Files are polled (size and modification time), which works on every
platform and file system without extra packages; a build's cost dwarfs the poll.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from reportgen.config import Manifest
from reportgen.model.sources import folder_of, weight_files
from reportgen.site.pages import template_dir

Snapshot = dict[Path, tuple[int, int] | None]


def watched_paths(manifest_path: Path, manifest: Manifest | None) -> list[Path]:
    """The files a build reads: the manifest, and (when it could be read) its images and local
    weights file or transformers model folder; the templates and stylesheet always."""
    paths = [manifest_path]
    if manifest is not None:
        paths += [entry.path for entry in manifest.images]
        if manifest.model.weights is not None:
            paths.append(manifest.model.weights)
        folder = folder_of(manifest.model.name)
        if folder is not None:  # a transformers model's folder: its config, processor and weights
            paths += weight_files(folder)
    paths += sorted(p for p in template_dir().iterdir() if p.is_file())
    return paths


def snapshot(paths: Iterable[Path]) -> Snapshot:
    """Size and modification time of each path (``None`` for a missing or unreadable one)."""
    found: Snapshot = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found[Path(path)] = None
        else:
            found[Path(path)] = (st.st_size, st.st_mtime_ns)
    return found


def wait_for_change(
    paths: list[Path],
    before: Snapshot | None = None,
    interval: float = 0.25,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[Path]:
    """Block until one of ``paths`` differs from ``before`` (default: from now); return those.

    Pass the snapshot taken before a build read its inputs, so that a file saved while it ran
    starts the next build. A change is only returned once the files have stayed the same for one
    more ``interval``, so an editor or a copy still writing is not built half-way. Returns ``[]``
    if ``should_stop()`` becomes true first.
    """
    if before is None:
        before = snapshot(paths)
    while not should_stop():
        now = snapshot(paths)
        if now == before:
            sleep(interval)
            continue
        while not should_stop():  # let the writes settle
            sleep(interval)
            settled = snapshot(paths)
            if settled == now:
                break
            now = settled
        changed = [path for path in now if now[path] != before.get(path)]
        if changed:
            return changed
        before = now  # changed and changed back: nothing to build
    return []
