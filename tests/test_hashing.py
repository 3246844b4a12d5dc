"""File hashes are remembered by the file's stamp and never trusted once the file changed."""

from __future__ import annotations

import hashlib
import os

import pytest

from reportgen import hashing


@pytest.fixture
def reads(monkeypatch):
    """Counts the files actually read, with an empty memory and no racy window."""
    monkeypatch.setattr(hashing, "_known", {})
    counted = []
    real = hashing.sha256_file

    def sha256_file(path, *args):
        counted.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(hashing, "sha256_file", sha256_file)
    return counted


def test_an_unchanged_file_is_read_once(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    assert hashing.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert hashing.file_sha256(tmp_path / "." / "a.bin") == hashlib.sha256(b"first").hexdigest()
    assert reads == ["a.bin"]


def test_new_bytes_of_the_same_size_behind_a_restored_mtime_are_read(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(hashing, "RACY_NS", 0)
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    before = os.stat(path)
    assert hashing.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"other")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # size and mtime as they were
    assert hashing.file_sha256(path) == hashlib.sha256(b"other").hexdigest()  # the change time moved
    assert reads == ["a.bin", "a.bin"]


def test_a_file_written_a_moment_ago_is_not_remembered(tmp_path, reads):
    # Timestamps tick coarsely: a file changed just now could change again with the same stamp.
    path = tmp_path / "a.bin"
    path.write_bytes(b"first")
    hashing.file_sha256(path)
    hashing.file_sha256(path)
    assert reads == ["a.bin", "a.bin"]
