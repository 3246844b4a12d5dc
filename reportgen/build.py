"""``reportgen build``: manifest in, static site out.

The pipeline reads top to bottom: validated manifest -> model -> per batch of images: decode and
preprocess, run the model with attention capture, the three experiments, figures -> pages and
results.json -> the finished folder swapped in for the old one.

The site is built in a staging folder beside the output and swapped in only when complete, so an
interrupted or failed build leaves the previous site as it was; one build at a time holds the
output folder's lock (see :mod:`reportgen.swap`). An output folder is only replaced when it is
empty or carries reportgen's marker file: a user's own folder is never deleted.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import reportgen
from reportgen import outdir
from reportgen.cache import STATUS_FILE, Status, image_key, read_status, reuse, reuse_file, settings_key
from reportgen.config import ImageEntry, Manifest
from reportgen.config.options import DEFAULT_OUTPUT, DEVICE_PATTERN, BuildOptions  # noqa: F401 (DEVICE_PATTERN re-exported)
from reportgen.errors import ImageError, OutputError, ReportgenError
from reportgen.site.figures import write_colourbar
from reportgen.site.pages import failure_record, write_site
from reportgen.site.summary import ObjectTable, fraction_lowered, summarise_pairs
from reportgen.swap import MARKER, OutputLock, make_staging, recover, remove_tree, swap_in


@dataclass
class BuildReport:
    """What a build did: where it wrote, images reused from the cache, which failed and why,
    warnings, how long it took and how long of that loading the model (``None``: no model was
    loaded, because no image needed it or a kept model was used)."""

    output: Path
    images: int = 0
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    model_load_seconds: float | None = None


ProgressCallback = Callable[[int], None]


def _output_errors(function):
    """Report an OSError of the build (read-only or full disk, no permission, a file where a
    folder should be, a name too long) as one sentence naming the output and the cause."""

    @functools.wraps(function)
    def wrapper(manifest: Manifest, options: BuildOptions, *args, **kwargs):
        try:
            return function(manifest, options, *args, **kwargs)
        except OSError as err:
            raise OutputError.from_os_error(err, options.output) from None

    return wrapper


@_output_errors
def build(manifest: Manifest, options: BuildOptions, progress: ProgressCallback | None = None) -> BuildReport:
    """Build the site for ``manifest``.

    Args:
        manifest: a validated manifest (with any command-line overrides applied).
        options: output folder, device, batch size, strictness, cache use.
        progress: called with the number of images just finished.

    Raises:
        ReportgenError: for an output folder that must not be replaced, a model that cannot be
            loaded, (with ``strict``) the first failing image, or (without ``wait``) an output
            folder another build is writing.
    """
    started = time.perf_counter()
    output = options.output.resolve()
    report = BuildReport(output=output)
    # Everything from here to the swap happens under the output folder's lock.
    lock = OutputLock(output).acquire(wait=options.wait, on_wait=options.on_wait, warnings=report.warnings)
    staging = None
    try:
        restored = recover(output, locked=lock.held)  # before anything else
        if restored is not None:
            report.warnings.append(f"{output}: put back the site that an interrupted build left in {restored.name}.")
        check_replaceable(output, manifest)
        global_key = settings_key(manifest)
        previous = None if options.force else read_status(output, global_key, report.warnings)
        staging = make_staging(output)
        status = Status(settings_key=global_key)
        records: dict[str, dict] = {}
        todo: list[tuple[ImageEntry, str]] = []
        for entry in manifest.images:
            try:
                key = image_key(entry, global_key)
            except OSError as err:
                _fail(entry, f"{entry.path.name}: could not be read ({err.strerror or err})", options, report, records)
                _advance(progress)
                continue
            record = reuse(previous, entry, key, output, staging, report.warnings) if previous else None
            if record is None:
                todo.append((entry, key))
                continue
            records[entry.slug] = record
            status.entries[entry.slug] = {"key": key, "record": record}
            report.reused += 1
            _advance(progress)
        if todo:
            # Only now is a model needed: a rebuild with nothing changed never loads (or imports) one.
            from reportgen.compute import analyse

            status.model_run = analyse(
                manifest, options, todo, staging, report, records, status,
                fail=lambda entry, message: _fail(entry, message, options, report, records),
                progress=progress,
            )
        else:
            status.model_run = previous.model_run if previous else None
        ordered = [records[entry.slug] for entry in manifest.images]
        tables = _object_tables(ordered)
        colourbar = "assets/colourbar.png"
        # It depends only on the colour map, which is in the settings key: a rebuild with the
        # same settings links the old one (and so needs no matplotlib at all).
        if previous is None or not reuse_file(output, staging, colourbar):
            with outdir.open_new(staging, colourbar) as file:
                write_colourbar(manifest.output.cmap, file)
        write_site(
            staging,
            run=run_metadata(manifest, status.model_run, ordered),
            records=ordered,
            pairs=summarise_pairs(tables),
            lowered=fraction_lowered(tables),
            colourbar=colourbar,
        )
        outdir.write_text(staging, STATUS_FILE, status.to_json() + "\n")  # written last
        swap_in(staging, output)
    finally:
        if staging is not None and staging.exists():
            remove_tree(staging)
        lock.release()
    report.images = len(manifest.images)
    report.seconds = time.perf_counter() - started
    return report


def _advance(progress: ProgressCallback | None, count: int = 1) -> None:
    if progress:
        progress(count)


def _object_tables(records: list[dict]) -> list[ObjectTable]:
    """(base labels, plain, rollout similarities) of every image with objects."""
    tables = []
    for record in records:
        objects = record.get("objects")
        if objects and objects["objects"]:
            tables.append(
                (
                    [o["base_label"] for o in objects["objects"]],
                    np.asarray(objects["plain_similarity"], dtype=np.float64),
                    np.asarray(objects["rollout_similarity"], dtype=np.float64),
                )
            )
    return tables


def _fail(entry: ImageEntry, message: str, options, report, records) -> None:
    if options.strict:
        raise ImageError(f"images[{entry.index}] (id {entry.id!r}): {message}")
    report.failed.append((entry.id, message))
    records[entry.slug] = failure_record(entry, message)


def check_replaceable(output: Path, manifest: Manifest) -> None:
    """Refuse to replace a folder reportgen did not make (unless it is empty), or one holding the inputs."""
    if output.exists() and not output.is_dir():
        raise ReportgenError(f"{output}: exists and is not a folder; choose another output with --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ReportgenError(
            f"{output}: the folder is not empty and was not made by reportgen (no {MARKER} file in it); "
            "refusing to replace it. Choose another output folder with --output, or empty this one."
        )
    inputs = [manifest.path, *(entry.path for entry in manifest.images)]
    if manifest.model.weights is not None:
        inputs.append(manifest.model.weights)
    for path in (Path(p).resolve() for p in inputs):
        if path == output or output in path.parents:
            raise ReportgenError(
                f"{output}: holds this build's own input {path}; replacing the folder would delete it. "
                "Choose another output folder with --output."
            )


def generated_at() -> str:
    """Build time for the footer: SOURCE_DATE_EPOCH when set, for reproducible builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def run_metadata(manifest: Manifest, model_run: dict | None, records: list[dict]) -> dict:
    """Everything about the run a reader (or script) needs to interpret the numbers.

    ``records`` are the site's image records: what the detector did is read from them, so it
    describes the pages as they are, cached or not.
    """
    if model_run is None:  # every image failed on the first build: nothing was run
        model_run = {"model": None, "capture": None, "versions": {"reportgen": reportgen.__version__}}
    return {
        "title": manifest.output.title,
        "generated": generated_at(),
        **model_run,
        "detector": _detector_run(manifest, records),
        "settings": {
            "head_fusion": manifest.attention.head_fusion,
            "discard_ratio": manifest.attention.discard_ratio,
            "detector": manifest.detector.name,
            "detector_threshold": manifest.detector.threshold,
            "cmap": manifest.output.cmap,
            "alpha": manifest.output.alpha,
        },
    }


def _detector_run(manifest: Manifest, records: list[dict]) -> dict | None:
    """The detector asked for, and whether it was ``used``, ``not needed`` (every ``multi`` image
    has boxes in the manifest) or ``not available`` (with the reason, published with the site,
    since its readers never see the build's warning); None with ``--detector none``."""
    if manifest.detector.name is None:
        return None
    found = [r["objects"] for r in records if r.get("objects") and r["objects"]["source"] != "manifest"]
    reasons = [o["detector_unavailable"] for o in found if o.get("detector_unavailable")]
    return {
        "name": manifest.detector.name,
        "threshold": manifest.detector.threshold,
        "status": "not available" if reasons else "used" if found else "not needed",
        "reason": reasons[0] if reasons else None,
        "images_without_objects": len(reasons),
    }
