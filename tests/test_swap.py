"""Issue 11: the swap, the clean-up of what killed builds leave, and one build per output folder.

Each test runs the real program (``python3 -m reportgen.cli build``). The swap is killed (SIGKILL)
at each of its steps through the ``REPORTGEN_TEST_KILL_AT`` hook, with the atomic exchange and
with the two-rename fallback (``REPORTGEN_TEST_NO_EXCHANGE``): after each, a complete site is at
the output path, or the next build puts one back before anything else, and no complete copy is
ever deleted. Builds into one output folder at once are run side by side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import source_env, write_manifest, write_photo
from sitecheck import broken_links, parse

from reportgen.cli import main

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and flock")


def _run(manifest: Path, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out), *args],
        cwd=out.parent, env={**source_env(), **env}, capture_output=True, text=True, timeout=300,
    )


def _start(manifest: Path, out: Path, stderr: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out), *args],
        cwd=out.parent, env=source_env(), stdout=subprocess.DEVNULL, stderr=stderr.open("w"), text=True,
    )


def _title(folder: Path) -> str:
    return json.loads((folder / "results.json").read_text())["title"]


def _assert_complete(folder: Path, title: str, ids=("cat", "dog")) -> None:
    """A whole site: marker, status file, every page and link, results.json of ``ids``."""
    assert (folder / ".reportgen-site").is_file() and (folder / ".reportgen-status.json").is_file()
    assert parse(folder / "index.html").links and broken_links(folder) == []
    results = json.loads((folder / "results.json").read_text())
    assert results["title"] == title and [i["id"] for i in results["images"]] == list(ids)


def _beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _leftovers(out: Path) -> list[str]:
    """What is beside the output but the lock file (which a killed build leaves; it is harmless)."""
    return [name for name in _beside(out) if name != f".{out.name}.lock"]


@pytest.fixture
def two_sites(tmp_path):
    """A site titled A at tmp_path/out, and manifests A and B of the same two images (B differs only
    in its title, so its builds reuse every image and load no model)."""
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        write_photo(folder / "cat.png", (48, 40), seed=1)
        write_photo(folder / "dog.png", (40, 48), seed=2)
        write_manifest(folder, [{"path": "cat.png"}, {"path": "dog.png"}], output={"title": name.upper()})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(tmp_path / "a" / "manifest.yaml"), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, tmp_path / "a" / "manifest.yaml", tmp_path / "b" / "manifest.yaml"


# (swap, step, the title at the output path right after the kill: None = nothing there)
STEPS = [
    ("exchange", "before-swap", "A"),
    ("exchange", "after-swap", "B"),
    ("exchange", "while-removing", "B"),
    ("renames", "before-swap", "A"),
    ("renames", "after-move-aside", None),
    ("renames", "after-swap", "B"),
    ("renames", "while-removing", "B"),
]


@pytest.mark.parametrize("swap, step, at_output", STEPS, ids=[f"{s}-{t}" for s, t, _ in STEPS])
def test_a_build_killed_at_any_step_of_the_swap_leaves_a_site_or_one_the_next_build_puts_back(
    two_sites, swap, step, at_output
):
    if swap == "exchange":
        from reportgen.swap import _renameat2

        if _renameat2() is None:
            pytest.skip("no renameat2 on this system")
    out, manifest_a, manifest_b = two_sites
    fallback = {"REPORTGEN_TEST_NO_EXCHANGE": "1"} if swap == "renames" else {}
    killed = _run(manifest_b, out, "--quiet", REPORTGEN_TEST_KILL_AT=step, **fallback)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # Which swap ran shows in what it left: the fallback moves the old site to .out.old-PID.
    left = _leftovers(out)
    if step == "before-swap":
        assert left == [f".out.building-{_pid(left)}"]
        _assert_complete(out.parent / left[0], "B")  # the finished staging folder
    elif swap == "exchange":
        assert left == [f".out.building-{_pid(left)}"], left  # the previous site, swapped out
    else:
        assert f".out.old-{_pid(left)}" in left, left
    if step == "after-move-aside":
        assert not out.exists()
        _assert_complete(out.parent / f".out.old-{_pid(left)}", "A")
        _assert_complete(out.parent / f".out.building-{_pid(left)}", "B")
    else:
        _assert_complete(out, at_output)
    if step == "while-removing":
        (half_removed,) = [out.parent / name for name in left]
        assert (half_removed / ".reportgen-site").is_file() and not (half_removed / ".reportgen-status.json").exists()

    # The next build puts a site back (the previous one) before anything else: killed just before
    # its own swap, it has left a complete site at the output and no leftover of the killed build.
    again = _run(manifest_b, out, "--quiet", REPORTGEN_TEST_KILL_AT="before-swap")
    assert again.returncode == -signal.SIGKILL, again.stderr
    _assert_complete(out, at_output or "A")
    assert len(_leftovers(out)) == 1 and _leftovers(out)[0].startswith(".out.building-")

    finished = _run(manifest_b, out)
    assert finished.returncode == 0, finished.stderr
    _assert_complete(out, "B")
    assert _beside(out) == [], "leftovers (or the lock file) beside the output"


def _pid(names: list[str]) -> str:
    pids = {name.rpartition("-")[2] for name in names}
    assert len(pids) == 1, names
    return pids.pop()


def test_an_interrupted_two_rename_swap_is_put_back_and_said_so(two_sites):
    out, manifest_a, manifest_b = two_sites
    killed = _run(manifest_b, out, REPORTGEN_TEST_KILL_AT="after-move-aside", REPORTGEN_TEST_NO_EXCHANGE="1")
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    result = CliRunner().invoke(main, ["build", str(manifest_a), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "put back the site that an interrupted build left in .out.old-" in result.output
    _assert_complete(out, "A")
    assert _beside(out) == []


def test_a_site_moved_aside_by_a_killed_swap_is_put_back_even_when_the_next_build_fails(two_sites):
    out, manifest_a, _ = two_sites
    (pid,) = _dead_pids(1)
    os.rename(out, out.parent / f".out.old-{pid}")  # as a two-rename swap killed half-way leaves it
    broken = out.parent / "broken"
    broken.mkdir()
    (broken / "cat.png").write_bytes(b"not an image")
    manifest = write_manifest(broken, [{"path": "cat.png"}])
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--strict"])
    assert result.exit_code == 1, result.output
    _assert_complete(out, "A")
    assert _beside(out) == []


def _dead_pids(count: int) -> list[int]:
    """Process ids that no process has now."""
    found = []
    for pid in range(99999, 10**7):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            found.append(pid)
            if len(found) == count:
                return found
        except PermissionError:
            pass
    raise AssertionError("no free process ids")


def test_leftovers_are_deleted_only_when_they_are_reportgens(two_sites):
    out, manifest_a, _ = two_sites
    pid, pid2 = _dead_pids(2)
    backup = out.parent / f".out.old-{pid}"  # a user's own backup, named like a leftover
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    unmarked = out.parent / f".out.building-{pid}"
    unmarked.mkdir()
    (unmarked / "index.html").write_text("mine too")
    empty = out.parent / f".out.old-{pid2}"  # killed between making a folder and marking it
    empty.mkdir()
    ours = out.parent / f".out.building-{pid2}"  # a killed build's unfinished staging folder
    (ours / "figures").mkdir(parents=True)
    (ours / ".reportgen-site").write_text("x")
    result = CliRunner().invoke(main, ["build", str(manifest_a), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (backup / "notes.txt").read_text() == "mine"
    assert (unmarked / "index.html").read_text() == "mine too"
    assert not empty.exists() and not ours.exists()
    _assert_complete(out, "A")


def _wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if text in line:
                return line
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no line with {text!r} in {path.read_text()!r}")


def _wait_for_staging(out: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the build ended before the test got going"
        if any(True for staging in out.parent.glob(f".{out.name}.building-*") if (staging / "figures").is_dir()):
            return
        time.sleep(0.02)
    raise AssertionError("the first build never started writing")


def test_builds_into_one_output_at_once_wait_for_each_other_or_fail_at_once_with_no_wait(tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        write_photo(many / f"photo-{i}.png", (48, 40), seed=100 + i)
    first_manifest = write_manifest(many, [{"path": f"photo-{i}.png"} for i in range(40)])
    two = tmp_path / "two"
    two.mkdir()
    write_photo(two / "cat.png", (48, 40), seed=1)
    write_photo(two / "dog.png", (40, 48), seed=2)
    second_manifest = write_manifest(two, [{"path": "cat.png"}, {"path": "dog.png"}], output={"title": "second"})
    out = tmp_path / "out"

    first = _start(first_manifest, out, tmp_path / "first.err", "--batch-size", "1")
    _wait_for_staging(out, first)
    second = _start(second_manifest, out, tmp_path / "second.err")
    interrupted = _start(second_manifest, out, tmp_path / "interrupted.err")
    try:
        # --no-wait: exit 1 at once, naming the folder and the process writing it.
        started = time.monotonic()
        busy = _run(second_manifest, out, "--no-wait")
        assert busy.returncode == 1, busy.stderr
        assert first.poll() is None, "the first build finished before --no-wait was tried"
        assert busy.stderr.strip().splitlines() == [busy.stderr.strip()], busy.stderr  # one line
        assert str(out) in busy.stderr and f"process {first.pid}" in busy.stderr and "Traceback" not in busy.stderr
        assert time.monotonic() - started < 60

        # Without it: the builds say whom they wait for, and wait.
        line = _wait_for_line(tmp_path / "second.err", "waiting", second)
        assert f"process {first.pid}" in line and str(out) in line, line
        _wait_for_line(tmp_path / "interrupted.err", "waiting", interrupted)
        assert first.poll() is None and second.poll() is None

        # Ctrl-C while waiting: the usual exit 130, no traceback, nothing touched.
        interrupted.send_signal(signal.SIGINT)
        assert interrupted.wait(timeout=60) == 130
        text = (tmp_path / "interrupted.err").read_text()
        assert "interrupted" in text and "Traceback" not in text, text

        assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()
        assert second.wait(timeout=300) == 0, (tmp_path / "second.err").read_text()
    finally:
        for process in (first, second, interrupted):
            if process.poll() is None:
                process.kill()
                process.wait()
    _assert_complete(out, "second")  # the build started second finished last
    assert _beside(out) == [], "leftovers (or the lock file) beside the output"


def test_watch_holds_the_lock_only_while_it_builds(two_sites):
    from test_watch import _Program

    out, manifest_a, manifest_b = two_sites
    program = _Program(manifest_a, out)
    try:
        program.wait_for("watching")
        other = _run(manifest_b, out, "--no-wait")  # while the watcher waits for changes
        assert other.returncode == 0, other.stderr
        _assert_complete(out, "B")
    finally:
        assert program.stop() == 0, program.lines
