"""Each image's figures, written in the background while the model runs the next batch."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from reportgen.site.figures import write_image_figures
from reportgen.site.scales import ScaleSetting

if TYPE_CHECKING:
    from reportgen.experiments import ImageResult


class FigureWriter:
    """Writes each image's figures into ``root`` in one thread by default (the forward pass spends
    its time in torch kernels that release the GIL), or with ``jobs > 1`` in that many worker
    processes. Figures are single-threaded and the forward pass is not, so on a few cores the gain
    is the time the forward pass leaves idle.

    :meth:`finished` hands back ``(result, written)`` in submission order, where ``written`` is the
    image's figure index or the exception that stopped its figures.
    """

    def __init__(self, root: Path, jobs: int, batch_size: int):
        self.root = root
        if jobs > 1:
            # spawn, not fork: forking a process that runs torch's thread pools is unsafe.
            self._pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reportgen-figures")
        # Images waiting for a worker: about one batch, so memory stays bounded (at most about two
        # batches of decoded images are alive, this one and the one the model is running).
        self._limit = batch_size + jobs
        self._pending: deque[tuple[ImageResult, Future]] = deque()
        self._done: list[tuple[ImageResult, dict | BaseException]] = []

    def __enter__(self) -> FigureWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def preload(self, function: Callable[[], None]) -> None:
        """Run ``function`` in the figure thread ahead of the figures (a no-op with processes,
        which import what they need when they start)."""
        if isinstance(self._pool, ThreadPoolExecutor):
            self._pool.submit(function)

    def submit(
        self,
        result: ImageResult,
        cmap: str,
        scale: ScaleSetting,
        num_prefix_tokens: int,
        heads: int,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Queue one image's figures (in ``figures/<slug>``); waits while too many are queued.
        ``done`` is called as soon as they are written or have failed, from the worker's thread
        (or the pool's), so a progress bar moves per image while the model runs the next batch."""
        prefix = f"figures/{result.entry.slug}"
        args = (result, self.root, prefix, cmap, num_prefix_tokens, heads, scale)
        future = self._pool.submit(write_image_figures, *args)
        if done is not None:
            future.add_done_callback(lambda _future: done())
        self._pending.append((result, future))
        while len(self._pending) > self._limit:
            self._collect(self._pending.popleft())

    def finished(self, wait: bool = False) -> list[tuple[ImageResult, dict | BaseException]]:
        """Images whose figures are written, in order; with ``wait``, all of them."""
        while self._pending and (wait or self._pending[0][1].done()):
            self._collect(self._pending.popleft())
        done, self._done = self._done, []
        return done

    def _collect(self, pending: tuple[ImageResult, Future]) -> None:
        result, future = pending
        try:
            written = future.result()
        except Exception as err:  # re-raised in the worker; reported per image
            written = err
        self._done.append((result, written))
