"""The status file and the old site are untrusted input: a tampered cache can make a rebuild
recompute, never write outside the output folder, link to anything but the pages, or carry a file
from elsewhere into the new site."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import source_env, write_manifest, write_photo

from reportgen import outdir
from reportgen.cache import STATUS_FILE
from reportgen.cli import main

MULTI = {"kind": "multi", "objects": [{"label": "x", "box": [0, 0, 20, 20]}, {"label": "y", "box": [10, 5, 40, 30]}]}


def _images(ids):
    return [{"path": f"{i}.png", "id": i, **(MULTI if i.startswith("m") else {})} for i in ids]


def _project(folder, ids):
    for n, i in enumerate(ids):
        write_photo(folder / f"{i}.png", (40 + 4 * n, 32), seed=n)
    return write_manifest(folder, _images(ids))


def _cli(manifest, site):
    """``reportgen build`` in a subprocess, as a user runs it."""
    env = {**source_env(), "SOURCE_DATE_EPOCH": "1700000000"}
    return subprocess.run(
        [sys.executable, "-m", "reportgen.cli", "build", str(manifest), "-o", str(site)],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _tree(folder, skip):
    """Every path under ``folder`` outside ``skip`` (and staging folders beside it), with its bytes."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        if path == skip or skip in path.parents or path.name.startswith(f".{skip.name}."):
            continue
        tree[str(path)] = path.read_bytes() if path.is_file() and not path.is_symlink() else os.readlink(path) if path.is_symlink() else None
    return tree


def _status(site):
    return json.loads((site / STATUS_FILE).read_text(encoding="utf-8"))


def _page_links(site):
    """Targets of the links (``<a href>``) of every page."""
    return {
        href
        for page in site.glob("*.html")
        for href in re.findall(r"<a\b[^>]*\bhref=\"([^\"]*)\"", page.read_text(encoding="utf-8"))
    }


def test_tampered_records_are_recomputed_with_one_warning_each_and_write_nothing_outside(tmp_path):
    ids = ["abs", "up", "js", "m-label", "m-utf", "types", "nan", "other", "figs", "m-good", "good"]
    manifest = _project(tmp_path, ids)
    site = tmp_path / "out" / "site"
    first = _cli(manifest, site)
    assert first.returncode == 0, first.stderr
    original = _status(site)
    assert set(original["entries"]) == set(ids)

    status = json.loads(json.dumps(original))
    records = {slug: entry["record"] for slug, entry in status["entries"].items()}
    pth = tmp_path / "lib" / "python3" / "site-packages" / "evil.pth"
    pth.parent.mkdir(parents=True)
    records["abs"]["page"] = str(pth)
    records["up"]["page"] = "../../x.html"
    records["js"]["page"] = "javascript:alert(document.cookie)"
    records["m-label"]["objects"]["labels"][0] = records["m-label"]["objects"]["objects"][0]["label"] = "w" * 5000
    records["m-utf"]["objects"]["objects"][1]["base_label"] = "\ud800"  # a lone surrogate
    records["types"]["size"] = "40x32"
    records["nan"]["rollout"]["spearman"] = float("nan")
    status["entries"]["other"]["record"] = records["good"]  # another image's record under this slug
    records["figs"]["figures"]["thumbnail"] = "../../../etc/passwd"
    records["figs"]["figures"]["explorer"]["heads"] = 10**9
    (site / STATUS_FILE).write_text(json.dumps(status), encoding="utf-8")  # NaN as JSON's NaN literal
    tampered = {"abs", "up", "js", "m-label", "m-utf", "types", "nan", "other", "figs"}

    before = _tree(tmp_path, site)
    second = _cli(manifest, site)
    assert second.returncode == 0, second.stderr
    assert _tree(tmp_path, site) == before  # nothing written (or deleted) outside the site
    assert not (tmp_path / "x.html").exists() and not pth.exists()

    lines = second.stderr.splitlines()
    for slug in ids:
        mine = [line for line in lines if f"entry {slug!r}" in line]
        assert len(mine) == (slug in tampered), (slug, mine)
        if mine:
            assert str(site / STATUS_FILE) in mine[0] and "recomputed" in mine[0]
            assert "wwwww" not in mine[0] and "javascript" not in mine[0]
    assert f"{len(ids)} of {len(ids)} images, {len(ids) - len(tampered)} unchanged" in second.stderr

    # Every tampered entry was recomputed: the status is the first build's again.
    assert _status(site)["entries"] == original["entries"]
    assert _page_links(site) <= {f"{slug}.html" for slug in ids} | {"index.html", "results.json"}
    assert sorted(p.name for p in site.glob("*.html")) == sorted(["index.html", *(f"{slug}.html" for slug in ids)])
    assert "w" * 600 not in (site / "m-label.html").read_text(encoding="utf-8")


def _build(manifest, site):
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(site), "--quiet"])


def test_figures_linked_from_elsewhere_are_not_carried_over(tmp_path):
    ids = ["a", "b", "c"]
    manifest = _project(tmp_path, ids)
    site = tmp_path / "site"
    assert _build(manifest, site).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # figures/a: a symbolic link to another folder holding files with the figures' names.
    for figure in (site / "figures" / "a").iterdir():
        (elsewhere / figure.name).write_bytes(b"not from this site")
    (elsewhere / "secret.txt").write_text("secret")
    real_a = tmp_path / "real-a"
    (site / "figures" / "a").rename(real_a)
    (site / "figures" / "a").symlink_to(elsewhere, target_is_directory=True)
    # One figure of b and the colour bar: symbolic links to files elsewhere.
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret bytes")
    (site / "figures" / "b" / "thumb.jpg").unlink()
    (site / "figures" / "b" / "thumb.jpg").symlink_to(secret)
    (site / "assets" / "colourbar.png").unlink()
    (site / "assets" / "colourbar.png").symlink_to(secret)
    # A stray file in c's folder is not one of its figures.
    (site / "figures" / "c" / "stray.txt").write_text("stray")
    outside = {(p.stat().st_dev, p.stat().st_ino) for p in [secret, *elsewhere.iterdir()]}

    result = _build(manifest, site)
    assert result.exit_code == 0, result.output
    assert "figures/a is a symbolic link" in result.output and "figures/b/thumb.jpg is a symbolic link" in result.output
    for path in site.rglob("*"):
        assert not path.is_symlink(), path
        if path.is_file():
            assert (path.stat().st_dev, path.stat().st_ino) not in outside, path
            assert path.read_bytes() not in (b"secret bytes", b"not from this site", b"secret"), path
    assert sorted(p.name for p in (site / "figures" / "a").iterdir()) == sorted(p.name for p in real_a.iterdir())
    assert not (site / "figures" / "c" / "stray.txt").exists()
    assert (site / "assets" / "colourbar.png").read_bytes().startswith(b"\x89PNG")
    assert elsewhere.is_dir() and secret.read_bytes() == b"secret bytes"  # left as they were


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda run: run["model"].update(name="n" * 5000), "model_run.model.name"),
        (lambda run: run["model"].update(grid="4x4"), "model_run.model.grid"),
        (lambda run: run["model"]["data_config"].pop("mean"), "model_run.model.data_config.mean"),
        (lambda run: run.update(model=None), "model_run.model"),
    ],
)
def test_a_model_run_that_does_not_fit_discards_the_cache(tmp_path, change, problem):
    manifest = _project(tmp_path, ["a", "m"])
    site = tmp_path / "site"
    assert _build(manifest, site).exit_code == 0
    status = _status(site)
    original = json.loads(json.dumps(status))
    change(status["model_run"])
    (site / STATUS_FILE).write_text(json.dumps(status), encoding="utf-8")
    result = _build(manifest, site)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "ignoring the build cache" in warnings[0] and problem in warnings[0], warnings
    assert _status(site) == original


def test_the_write_function_refuses_paths_outside_the_staging_folder(tmp_path):
    root = tmp_path / "staging"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "file.html").symlink_to(elsewhere / "target.html")
    for relative in ["../x.html", "a/../../x.html", str(tmp_path / "x.html"), "/etc/x", "linked/x.html", "linked/sub/x.html",
                     "file.html", "", ".."]:
        with pytest.raises(outdir.UnsafePathError):
            outdir.write_text(root, relative, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "staging"]
    assert list(elsewhere.iterdir()) == []
    outdir.write_text(root, "figures/a/ok.txt", "ok")  # folders inside are made
    assert (root / "figures" / "a" / "ok.txt").read_text() == "ok"
