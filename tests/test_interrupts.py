"""Issue 7: a build killed or interrupted half way leaves the previous site exactly as it was.

The build writes into a hidden staging folder beside the output (``.out.building-<pid>``) and
swaps it in only at the end. These tests start a real ``python3 -m reportgen.cli build`` process
on a manifest of many images, wait until it is half way (the staging folder has figures), and
stop it: SIGKILL (nothing can clean up), SIGINT (Ctrl-C: exit 130, a short message, no
traceback, no staging folder left) and SIGTERM.
"""

from __future__ import annotations

import json
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

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

IMAGES = 40


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def previous_site(tmp_path):
    """A finished site in tmp_path/out (two images) and a 40-image manifest for the next build."""
    first = tmp_path / "first"
    first.mkdir()
    write_photo(first / "cat.png", (48, 40), seed=1)
    write_photo(first / "dog.png", (40, 48), seed=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(write_manifest(first, [{"path": "cat.png"}, {"path": "dog.png"}])),
                                       "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    many = tmp_path / "many"
    many.mkdir()
    for i in range(IMAGES):
        write_photo(many / f"photo-{i}.png", (48, 40), seed=100 + i)
    manifest = write_manifest(many, [{"path": f"photo-{i}.png"} for i in range(IMAGES)])
    return out, manifest, _snapshot(out)


def _start_build(manifest: Path, out: Path) -> subprocess.Popen:
    env = source_env()
    return subprocess.Popen(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(out), "--batch-size", "1"],
        cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_half_way(process: subprocess.Popen, out: Path, figures: int = 5, timeout: float = 120) -> Path:
    """Poll until the staging folder beside ``out`` holds ``figures`` images' figures."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stdout, stderr = process.communicate()
            pytest.fail(f"the build ended (status {process.returncode}) before it was stopped:\n{stderr}")
        for staging in out.parent.glob(f".{out.name}.building-*"):
            try:
                done = sum(1 for p in (staging / "figures").iterdir() if p.is_dir())
            except OSError:
                continue
            if done >= figures:
                return staging
        time.sleep(0.02)
    process.kill()
    pytest.fail("the build never got half way")


def _assert_intact(out: Path, before: dict) -> None:
    assert _snapshot(out) == before, "the previous site changed"
    assert (out / "index.html").is_file()
    assert parse(out / "index.html").links, "index.html no longer parses"
    assert broken_links(out) == []
    assert [i["id"] for i in json.loads((out / "results.json").read_text())["images"]] == ["cat", "dog"]


def _stop(process: subprocess.Popen, out: Path, sig: int) -> tuple[int, str, Path]:
    staging = _wait_half_way(process, out)
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(f"the build did not stop within 60 s of signal {sig}")
    return process.returncode, stderr, staging


def test_sigkill_half_way_leaves_the_previous_site_intact(previous_site):
    out, manifest, before = previous_site
    code, _, staging = _stop(_start_build(manifest, out), out, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _assert_intact(out, before)
    assert not list(out.parent.glob(f".{out.name}.old-*"))


def test_sigint_half_way_exits_130_cleanly_and_leaves_the_previous_site_intact(previous_site):
    out, manifest, before = previous_site
    code, stderr, staging = _stop(_start_build(manifest, out), out, signal.SIGINT)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted" in stderr and len(stderr.strip().splitlines()) <= 2, stderr
    _assert_intact(out, before)
    assert not staging.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["first", "many", "out"], "nothing left beside the output"


def test_sigterm_half_way_leaves_the_previous_site_intact(previous_site):
    out, manifest, before = previous_site
    code, stderr, _ = _stop(_start_build(manifest, out), out, signal.SIGTERM)
    assert code != 0 and "Traceback" not in stderr
    _assert_intact(out, before)


def test_sigterm_leaves_no_staging_folder(previous_site):
    out, manifest, before = previous_site
    code, stderr, staging = _stop(_start_build(manifest, out), out, signal.SIGTERM)
    assert not staging.exists()
    _assert_intact(out, before)


def test_next_build_clears_the_staging_folder_of_a_killed_build(previous_site):
    out, manifest, before = previous_site
    _, _, staging = _stop(_start_build(manifest, out), out, signal.SIGKILL)
    assert staging.is_dir()  # SIGKILL cannot clean up
    again = out.parent / "first" / "manifest.yaml"
    result = CliRunner().invoke(main, ["build", str(again), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not staging.exists(), "a killed build's staging folder stays forever"
