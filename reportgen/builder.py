"""``reportgen build``: manifest in, static site out.

A build runs in phases, each a function below: plan (what the previous build's cache still
holds) -> compute (the model, the map methods and the experiments over the other images, their
figures written alongside) -> write (pages, results.json, the status file) -> swap (the finished
folder replaces the old one). Only these functions change the build's state; the model stage
(:mod:`reportgen.compute`) yields results and the site stage serialises them.

The site is built in a staging folder beside the output and swapped in only when complete, so an
interrupted or failed build leaves the previous site as it was; one build at a time holds the
output folder's lock (see :mod:`reportgen.swap`). An output folder is only replaced when it is
empty or carries reportgen's marker file: a user's own folder is never deleted.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from reportgen import outdir
from reportgen.cache import STATUS_FILE, Status, image_key, read_status, reuse, reuse_file, settings_key
from reportgen.config import BuildOptions, ImageEntry, Manifest
from reportgen.errors import ImageError, OutputError, ReportgenError
from reportgen.model.sources import folder_of
from reportgen.site.figures import (
    FIGURE_VERSION,
    layer_entropy_figure,
    leaderboard_data,
    leaderboard_figure,
    save_figure,
    write_colourbar,
)
from reportgen.site.pages import write_site
from reportgen.site.records import failure_record, image_record, model_run_record, record_text, run_record
from reportgen.site.scales import ScaleSetting
from reportgen.site.writer import FigureWriter
from reportgen.swap import MARKER, OutputLock, make_staging, recover, remove_tree, swap_in

if TYPE_CHECKING:  # the model stage imports torch; a build that reuses every image never does
    from reportgen.experiments import ImageResult

log = logging.getLogger(__name__)

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


#: Called with the number of images just finished (reused, failed, or with their figures written);
#: it may be called from the figure writer's thread.
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
    """Build the site for ``manifest``, in four phases: plan (what the previous build's cache
    still holds), compute (the model over the other images, figures written alongside), write
    (pages, results.json, the status file) and swap (the finished folder replaces the old one).

    Args:
        manifest: a validated manifest (with any command-line overrides applied).
        options: output folder, device, batch size, strictness, cache use.
        progress: called with the number of images just finished, one image at a time as its
            figures are written (from the figure writer's thread: it must be thread-safe).

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
        staging = make_staging(output)
        with _Collector() as collector:
            state = _BuildState(Status(settings_key=settings_key(manifest)), options, report, progress, collector)
            previous = _plan(manifest, options, output, staging, state)
            if state.todo:
                state.status.model_run = _compute(manifest, options, staging, state, cold=previous is None)
            else:
                state.status.model_run = previous.model_run if previous else None
            _write(manifest, output, staging, previous, state)
        swap_in(staging, output)
    finally:
        if staging is not None and staging.exists():
            remove_tree(staging)
        lock.release()
    report.images = len(manifest.images)
    report.seconds = time.perf_counter() - started
    return report


class _Collector:
    """Keeps Python's cyclic garbage collector off the objects that exist before and while the
    libraries load (torch, timm, the plotting libraries), for one build.

    A full collection scans every tracked object, and the records a build keeps trigger full
    collections; frozen objects are left out of them. The objects are unfrozen when the build
    ends, also on an error, so the collector is as it was; a freeze asked for after that (the
    figure thread's, late) is ignored. A process that froze objects of its own (``gc.freeze``)
    keeps its collector untouched.
    """

    def __init__(self) -> None:
        self.owned = False
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> _Collector:
        self.owned = gc.get_freeze_count() == 0
        self.freeze()
        return self

    def freeze(self) -> None:
        """Leave every object that exists now out of the build's collections."""
        with self._lock:
            if self.owned and not self._closed:
                gc.freeze()

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._closed = True
            if self.owned:
                gc.unfreeze()


@dataclass
class _BuildState:
    """What the phases of one build fill in: only :func:`build` and its phases change it."""

    status: Status
    options: BuildOptions
    report: BuildReport
    progress: ProgressCallback | None
    collector: _Collector
    records: dict[str, dict] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    todo: list[ImageEntry] = field(default_factory=list)

    def advance(self) -> None:
        if self.progress:
            self.progress(1)

    def fail(self, entry: ImageEntry, message: str) -> None:
        """An image failed: the build stops under ``--strict``, else its card says why."""
        if self.options.strict:
            raise ImageError(f"images[{entry.index}] (id {entry.id!r}): {message}")
        self.report.failed.append((entry.id, message))
        self.records[entry.slug] = failure_record(entry, message)

    def store(self, entry: ImageEntry, record: dict, cache: bool = True) -> None:
        self.records[entry.slug] = record
        if cache:
            self.status.entries[entry.slug] = {"key": self.keys[entry.slug], "record": record}


def _plan(manifest: Manifest, options: BuildOptions, output: Path, staging: Path, state: _BuildState) -> Status | None:
    """Phase 1: reuse what the previous build's cache holds for unchanged images (their figures
    carried into ``staging``); the rest go to ``state.todo``. Returns the previous status."""
    previous = None if options.force else read_status(output, state.status.settings_key, state.report.warnings)
    for entry in manifest.images:
        try:
            state.keys[entry.slug] = image_key(entry, state.status.settings_key, manifest.evaluate.checks(entry.id))
        except OSError as err:
            state.fail(entry, f"{entry.path.name}: could not be read ({err.strerror or err})")
            state.advance()
            continue
        record = reuse(
            previous, entry, state.keys[entry.slug], manifest.methods, output, staging, state.report.warnings,
            manifest.attention.target_count, manifest.attention.object_targets, manifest.evaluate.enabled,
        ) if previous else None
        if record is None:
            state.todo.append(entry)
            continue
        state.store(entry, record)
        state.report.reused += 1
        state.advance()
    return previous


def _compute(manifest: Manifest, options: BuildOptions, staging: Path, state: _BuildState, cold: bool) -> dict:
    """Phase 2: run the model over ``state.todo``, writing each image's figures in the background
    while the next batch runs (``cold``: there is no previous site to link the index's figures
    from). Returns the model-run record."""
    # Only now is a model needed: a rebuild with nothing changed never loads (or imports) one.
    from reportgen.compute import Computation
    from reportgen.experiments import ImageFailure

    state.collector.freeze()  # torch and timm are imported now
    computation = Computation(manifest, options.device, options.batch_size, options.model_cache)
    scale = ScaleSetting.of(manifest.output)
    settings = (manifest.output.cmap, scale)
    # Entered first, so the figure writer is shut down however this ends (also if the model
    # cannot be loaded).
    with FigureWriter(staging, options.jobs, options.batch_size) as figures:
        if cold:
            # With no previous site the index's figures are drawn, so their libraries are imported
            # in the figure thread while the model loads. A rebuild imports them only if a figure
            # it shows has changed; an image's own figures need none.
            def preload() -> None:
                _import_index_figure_libraries()
                state.collector.freeze()

            figures.preload(preload)
        for outcome in computation.results(state.todo):
            if isinstance(outcome, ImageFailure):
                state.fail(outcome.entry, outcome.message)
                state.advance()
            else:
                model = computation.model_run.model
                # An image counts as done once its figures are written: the model yields a
                # batch's images at once, the figures are written one by one.
                figures.submit(outcome, *settings, model.num_prefix_tokens, model.heads, done=state.advance)
            for result, written in figures.finished():
                _store_result(state, result, written, scale)
        for result, written in figures.finished(wait=True):
            _store_result(state, result, written, scale)
    state.report.model_load_seconds = computation.model_load_seconds
    state.report.warnings.extend(computation.warnings)
    return model_run_record(computation.model_run)


def _import_index_figure_libraries() -> None:
    import seaborn  # noqa: F401  (about 1 s with pandas, scipy and matplotlib)


def _store_result(state: _BuildState, result: ImageResult, written: dict | BaseException, scale: ScaleSetting) -> None:
    """Store an image's record once its figures are written (``written`` is the figure index, or
    the exception that stopped them; ``scale`` the colour scale they were drawn with)."""
    if isinstance(written, ImageError):
        state.fail(result.entry, str(written))
    elif isinstance(written, OSError):  # the output cannot be written (disk full ...): stops the build
        raise written
    elif isinstance(written, BaseException):  # a bug must cost one image, not the whole site
        log.debug("figures of %s failed", result.entry.id, exc_info=written)
        state.fail(result.entry, f"internal error in reportgen ({type(written).__name__}: {written})")
    else:
        # An image whose detector could not be loaded is not cached: the next build tries again.
        complete = result.objects is None or not result.objects.detector_unavailable
        state.store(result.entry, image_record(result, written, scale), cache=complete)


def _write(manifest: Manifest, output: Path, staging: Path, previous: Status | None, state: _BuildState) -> None:
    """Phase 3: the colour bar, the index's figures, pages, results.json, and the status file last."""
    ordered = [state.records[entry.slug] for entry in manifest.images]
    colourbar = "assets/colourbar.png"
    # It depends only on the colour map, which is in the settings key: a rebuild with the
    # same settings links the old one (and so needs no matplotlib at all).
    if previous is None or not reuse_file(output, staging, colourbar):
        with outdir.open_new(staging, colourbar) as file:
            write_colourbar(manifest.output.cmap, file)
    # The index's figures are drawn from the records (cached or new). Each name holds a hash of
    # what it shows, so a rebuild that changes none of it links the old one (and imports no
    # plotting library for it).
    drawn = [record.get("layer_entropy") for record in ordered if record.get("layer_entropy")]
    entropy = _index_figure(output, staging, previous, "entropy-by-layer", drawn, lambda: layer_entropy_figure(ordered)) if drawn else None
    board = leaderboard_data(ordered)  # None without the evaluation
    board_figure = _index_figure(output, staging, previous, "leaderboard", board, lambda: leaderboard_figure(board)) if board else None
    # results.json and the status file hold the same record text: each record is encoded once.
    texts = [record_text(record) for record in ordered]
    write_site(staging, run=run_record(manifest, state.status.model_run, ordered), records=ordered, colourbar=colourbar,
               layer_entropy=entropy, leaderboard_figure=board_figure, record_texts=texts)
    # Only the text of the very record an entry caches is shared with it.
    by_slug = {record["slug"]: text for record, text in zip(ordered, texts)
               if state.status.entries.get(record["slug"], {}).get("record") is record}
    outdir.write_text(staging, STATUS_FILE, state.status.to_json(by_slug) + "\n")  # written last


def _index_figure(output: Path, staging: Path, previous: Status | None, stem: str, data, draw: Callable) -> str:
    """The relative path of one of the index's figures, named by a hash of ``data`` (what it
    shows): linked from the previous site when it has the same, else drawn by ``draw()``."""
    digest = hashlib.sha256(json.dumps([FIGURE_VERSION, data], sort_keys=True).encode()).hexdigest()[:10]
    relative = f"assets/{stem}.{digest}.png"  # not in figures/, where image ids name folders
    if previous is None or not reuse_file(output, staging, relative):
        with outdir.open_new(staging, relative) as file:
            save_figure(draw(), file)
    return relative


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
    if folder_of(manifest.model.name) is not None:
        inputs.append(folder_of(manifest.model.name))
    for path in (Path(p).resolve() for p in inputs):
        if path == output or output in path.parents:
            raise ReportgenError(
                f"{output}: holds this build's own input {path}; replacing the folder would delete it. "
                "Choose another output folder with --output."
            )
