"""Broken environments get one sentence, not a traceback (issue 11).

Each case runs the real command line (a ``python3 -m reportgen.cli build`` process) and checks: exit status 1 (2 for an
option value that is never valid), one message naming the path or option and the cause, the
previous site unchanged, and no staging folder left beside the output.

Read-only and full file systems are small tmpfs mounts, and a folder without write permission is
tested with the capabilities that let root ignore permissions dropped (``setpriv``); those need
root, which the CI machine has, and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import source_env, write_manifest, write_photo

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT or shutil.which("mount") is None, reason="mounting a tmpfs needs root")


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _manifest(folder: Path, count: int = 1, size=(48, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_photo(folder / f"photo-{i}.png", size, seed=i)
    return write_manifest(folder, [{"path": f"photo-{i}.png"} for i in range(count)])


@dataclass
class _Run:
    exit_code: int
    output: str  # what the user saw on stderr (and stdout)


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> _Run:
    """Run ``reportgen build ARGS --quiet`` as a new process, as a user would."""
    process = subprocess.run(
        [*prefix, sys.executable, "-m", "reportgen.cli", "build", *args, "--quiet"],
        env=source_env(), capture_output=True, text=True, timeout=300,
    )
    return _Run(process.returncode, process.stderr + process.stdout)


def _one_message(output: str, *needles: str) -> None:
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert any(line.startswith(("reportgen: ", "Error: ")) for line in lines), output
    for needle in needles:
        assert needle in output, (needle, output)


def _no_leftovers(parent: Path, name: str) -> None:
    assert not [p.name for p in parent.glob(f".{name}.*")], "a staging folder was left beside the output"


def _site(manifest: Path, out: Path) -> dict[str, bytes | None]:
    """Build a site at ``out``; its snapshot."""
    result = _cli(str(manifest), "-o", str(out))
    assert result.exit_code == 0, result.output
    return _snapshot(out)


def _assert_refused(result: _Run, out: Path, before: dict, *needles: str) -> None:
    """Exit 1 with one message holding ``needles``; the site at ``out`` as ``before``; nothing left beside it."""
    assert result.exit_code == 1, result.output
    _one_message(result.output, *needles)
    assert _snapshot(out) == before
    _no_leftovers(out.parent, out.name)


@pytest.fixture
def previous(tmp_path):
    """A manifest and a finished site from it."""
    manifest = _manifest(tmp_path / "in")
    return manifest


def test_output_below_a_regular_file(tmp_path, previous):
    (tmp_path / "notes.txt").write_text("mine")
    result = _cli(str(previous), "-o", str(tmp_path / "notes.txt" / "site"))
    assert result.exit_code == 1
    _one_message(result.output, "notes.txt", "is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_name_too_long_for_the_file_system(tmp_path, previous):
    result = _cli(str(previous), "-o", str(tmp_path / ("x" * 300)))
    assert result.exit_code == 1
    _one_message(result.output, "too long for the file system")
    _no_leftovers(tmp_path, "x" * 300)


def test_input_size_below_the_patch_size(tmp_path, previous):
    result = _cli(str(previous), "-o", str(tmp_path / "site"), "--input-size", "7")
    assert result.exit_code == 1
    _one_message(result.output, "--input-size", "7", "8x8 patch")
    assert not (tmp_path / "site").exists()
    _no_leftovers(tmp_path, "site")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_cuda(tmp_path, previous):
    out = tmp_path / "site"
    before = _site(previous, out)
    result = _cli(str(previous), "-o", str(out), "--device", "cuda", "--force")
    _assert_refused(result, out, before, "--device cuda", "no CUDA device")


@pytest.mark.parametrize("device", ["meta", "gpu", "cuda:x", ""])
def test_devices_that_can_never_work_are_usage_errors(tmp_path, previous, device):
    result = _cli(str(previous), "-o", str(tmp_path / "site"), "--device", device)
    assert result.exit_code == 2
    _one_message(result.output, "--device", "expected auto, cpu, cuda, cuda:N or mps")
    assert not (tmp_path / "site").exists()


def test_a_folder_given_as_the_manifest(tmp_path):
    result = _cli(str(tmp_path), "-o", str(tmp_path / "site"))
    assert result.exit_code == 1
    _one_message(result.output, str(tmp_path), "is a directory")


def test_an_unknown_option_is_a_usage_error(tmp_path, previous):
    result = _cli(str(previous), "--no-such-option")
    assert result.exit_code == 2
    _one_message(result.output, "--no-such-option")


# -- file systems that refuse writes ----------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted in tmp_path/mnt (unmounted afterwards)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = []

    def mount(size: str, *extra: str) -> Path:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], check=True)
        mounted.append(mount_point)
        return mount_point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@needs_root
def test_read_only_file_system_leaves_the_previous_site(tmp_path, previous, tmpfs):
    mnt = tmpfs("4m")
    out = mnt / "site"
    before = _site(previous, out)
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    result = _cli(str(previous), "-o", str(out), "--force")
    _assert_refused(result, out, before, str(out), "read-only")


@needs_root
def test_full_disk_leaves_the_previous_site(tmp_path, previous, tmpfs):
    mnt = tmpfs("600k")
    out = mnt / "site"
    before = _site(previous, out)
    bigger = _manifest(tmp_path / "many", count=24, size=(320, 240))  # noise photos: far more than 600 kB of figures
    result = _cli(str(bigger), "-o", str(out))
    _assert_refused(result, out, before, str(out), "no space left")


@needs_root
def test_parent_folder_without_write_permission(tmp_path, previous):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "site"
    before = _site(previous, out)
    parent.chmod(0o555)
    try:
        # Root ignores permissions; without its capabilities it is an ordinary user here.
        result = _cli(str(previous), "-o", str(out), "--force",
                      prefix=("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"))
    finally:
        parent.chmod(0o755)
    _assert_refused(result, out, before, str(out), "permission denied")
