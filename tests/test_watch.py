"""``reportgen build --watch``: rebuilds on change, in one process, with the model kept loaded."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import source_env, write_manifest, write_photo

from reportgen.watch import wait_for_change, watched_paths

# --- polling, on real files; the "sleep" is where the test changes them --------------------------


def _sleeper(*steps):
    """A sleep function that runs one step per poll, then asks to stop."""
    pending = list(steps)
    state = {"stop": False, "polls": 0}

    def sleep(_seconds):
        state["polls"] += 1
        if pending:
            pending.pop(0)()
        else:
            state["stop"] = True

    return sleep, lambda: state["stop"], state


def test_a_changed_file_is_reported_once_it_has_settled(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("1")
    b.write_text("1")
    writes = [lambda: None, lambda: a.write_text("22"), lambda: a.write_text("333"), lambda: None]
    sleep, stop, state = _sleeper(*writes)
    assert wait_for_change([a, b], sleep=sleep, should_stop=stop) == [a]
    assert state["polls"] == 4  # seen at poll 2, still changing at 3, the same at 4


def test_appearing_and_disappearing_files_count_as_changes(tmp_path):
    a, missing = tmp_path / "a.txt", tmp_path / "later.png"
    a.write_text("1")
    sleep, stop, _ = _sleeper(lambda: missing.write_text("x"))
    assert wait_for_change([a, missing], sleep=sleep, should_stop=stop) == [missing]
    sleep, stop, _ = _sleeper(lambda: a.unlink())
    assert wait_for_change([a, missing], sleep=sleep, should_stop=stop) == [a]


def test_a_change_undone_before_it_settles_builds_nothing(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("1")
    stat = os.stat(a)

    def undo():
        a.write_text("1")
        os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    sleep, stop, _ = _sleeper(lambda: a.write_text("2"), undo, lambda: None)
    assert wait_for_change([a], sleep=sleep, should_stop=stop) == []  # stopped, having seen nothing to build


def test_watched_paths_are_the_inputs_of_a_build(tmp_path):
    from reportgen.config import load_manifest

    write_photo(tmp_path / "cat.png")
    write_photo(tmp_path / "dog.png")
    manifest_path = write_manifest(tmp_path, [{"path": "cat.png"}, {"path": "dog.png"}])
    templates = {"base.html", "image.html", "index.html", "style.css", "report.js"}
    unreadable = {p.name for p in watched_paths(manifest_path, None)}  # a manifest that does not load
    assert unreadable >= {"manifest.yaml", *templates} and not unreadable & {"cat.png", "dog.png"}
    watched = watched_paths(manifest_path, load_manifest(manifest_path))
    assert watched[0] == manifest_path and {p.name for p in watched} >= {"cat.png", "dog.png", *templates}


# --- the real program -------------------------------------------------------------------------


class _Program:
    """``reportgen build --watch`` in a subprocess, its stderr read line by line."""

    def __init__(self, manifest: Path, out: Path):
        env = source_env()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out), "--watch"],
            cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r}; got {self.lines}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def test_watch_rebuilds_on_change_and_loads_the_model_only_when_it_changes(tmp_path):
    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    write_photo(tmp_path / "dog.png", (40, 48), seed=2)
    images = [{"path": "cat.png", "caption": "first caption"}, {"path": "dog.png"}]
    manifest = write_manifest(tmp_path, images)
    out = tmp_path / "site"
    program = _Program(manifest, out)
    try:
        first = program.wait_for("Wrote ")
        assert "2 of 2 images" in first and "model loaded in" in first
        program.wait_for("watching")
        dog_before = json.loads((out / "results.json").read_text())["images"][1]["attention"]["mean_entropy"]

        # A caption: pages only, nothing recomputed.
        images[0]["caption"] = "second caption"
        write_manifest(tmp_path, images)
        line = program.wait_for("Wrote ")
        assert "2 unchanged" in line and "model loaded" not in line, line
        assert "second caption" in (out / "cat.html").read_text()

        # One image's bytes: that image only, through the model that stayed loaded.
        write_photo(tmp_path / "dog.png", (40, 48), seed=3)
        line = program.wait_for("Wrote ")
        assert "1 unchanged" in line and "model loaded" not in line, line
        dog_after = json.loads((out / "results.json").read_text())["images"][1]["attention"]["mean_entropy"]
        assert dog_after != dog_before

        # A broken manifest is reported and the site left as it was; fixing it rebuilds.
        page = (out / "cat.html").read_text()
        manifest.write_text("images: [unclosed\n")
        program.wait_for("fix it and save")
        report = program.lines[max(i for i, line in enumerate(program.lines) if "changed:" in line):]
        assert any("manifest.yaml" in line for line in report) and any("invalid YAML" in line for line in report), report
        program.wait_for("watching")
        assert (out / "cat.html").read_text() == page
        images[0]["caption"] = "third caption"
        write_manifest(tmp_path, images)
        line = program.wait_for("Wrote ")
        assert "2 unchanged" in line and "third caption" in (out / "cat.html").read_text()

        # Other model settings: a new model is loaded (and the old one let go).
        from conftest import TINY_MODEL

        write_manifest(tmp_path, images, model={**TINY_MODEL, "input_size": 48})
        line = program.wait_for("Wrote ")
        assert "2 of 2 images" in line and "unchanged" not in line and "model loaded in" in line, line
    finally:
        status = program.stop()
    assert status == 0, program.lines
    assert sum("model loaded" in line for line in program.lines) == 2  # the first build's and the new model's


def test_watch_on_an_up_to_date_site_loads_the_model_before_the_first_edit(tmp_path):
    from click.testing import CliRunner

    from reportgen.cli import main

    write_photo(tmp_path / "cat.png", (48, 40), seed=1)
    write_photo(tmp_path / "dog.png", (40, 48), seed=2)
    manifest = write_manifest(tmp_path, [{"path": "cat.png"}, {"path": "dog.png"}])
    out = tmp_path / "site"
    assert CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"]).exit_code == 0
    program = _Program(manifest, out)
    try:
        line = program.wait_for("Wrote ")
        assert "2 unchanged" in line and "model loaded" not in line, line  # nothing to compute
        assert "kept for rebuilds" in program.wait_for("model loaded in")  # then, while idle
        program.wait_for("watching")
        write_photo(tmp_path / "cat.png", (48, 40), seed=5)
        line = program.wait_for("Wrote ")
        assert "1 unchanged" in line and "model loaded" not in line, line
    finally:
        assert program.stop() == 0, program.lines
