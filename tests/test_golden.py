"""Golden-file test: the sample site, built through the CLI, against tests/golden/sample/.

The gold holds every page, ``results.json`` and ``files.txt`` (the name of every file the site
contains, so a lost or renamed figure or asset fails too; the figures' pixels are checked by
test_figures.py and test_browser.py). Gold and actual are compared byte for byte after the
third-party version strings (torch, timm, transformers, ...) are replaced by a placeholder in both:
they legitimately differ between machines. Everything else is compared exactly except the decimal
numbers, which may differ by NUMBER_TOLERANCE (relative, for numbers above 1: a token norm of 10
keeps only six or seven significant float32 digits) or one unit in their last printed digit,
whichever is larger: float32 sums come out differently in the last bits on CPUs with other vector
kernels, and that can flip the sixth decimal of results.json or the third of a page. Two builds on one machine
must still be byte-identical (the last test).

After an intended change, rewrite the gold and review it with ``git diff tests/golden``::

    REPORTGEN_UPDATE_GOLDEN=1 python3 -m pytest tests/test_golden.py

On a mismatch the actual files are written to ``$REPORTGEN_GOLDEN_ACTUAL`` (default: the test's
tmp_path/actual), so ``diff -r tests/golden/sample <that folder>`` shows everything.
"""

import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, source_env

pytestmark = [pytest.mark.offline_model, pytest.mark.slow]

GOLD = Path(__file__).resolve().parent / "golden" / "sample"
MANIFEST = REPO / "images" / "manifest.yaml"
UPDATE_COMMAND = "REPORTGEN_UPDATE_GOLDEN=1 python3 -m pytest tests/test_golden.py"
LISTING = "files.txt"
PLACEHOLDER = "VERSION"
DIFF_LINES = 40
LINE_WIDTH = 200

_JSON_VERSIONS = re.compile(r'"versions": \{([^{}]*)\}')
_JSON_ENTRY = re.compile(r'"([^"]+)": (?:"[^"]*"|null)')
_HTML_VERSIONS = re.compile(r"<dt>Versions</dt><dd>([^<]*)</dd>")
_DATA_HASHED = re.compile(r"(assets/entropy-by-layer)\.[0-9a-f]{10}\.png")
_DECIMAL = re.compile(r"-?\d+\.(\d+)(?:[eE][-+]?\d+)?")
NUMBER_TOLERANCE = 1e-5


def build_sample(out: Path) -> Path:
    """Build the sample manifest into ``out`` through the real CLI, with a fixed build date."""
    proc = subprocess.run(
        [sys.executable, "-m", "reportgen.cli", "build", str(MANIFEST), "-o", str(out), "--quiet"],
        env={**source_env(), "SOURCE_DATE_EPOCH": "1700000000"},
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def site_files(site: Path) -> list[str]:
    """Every file in the site (hidden ones included), as sorted relative POSIX paths."""
    return sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())


def compared_files(site: Path) -> dict[str, bytes]:
    """What the gold holds: the pages, results.json and the listing of every file."""
    files = {p.name: p.read_bytes() for p in sorted(site.glob("*.html"))}
    files["results.json"] = (site / "results.json").read_bytes()
    files[LISTING] = "".join(f"{name}\n" for name in site_files(site)).encode()
    return files


def read_gold() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(GOLD.iterdir()) if p.is_file()}


def _json_versions(block: re.Match) -> str:
    def entry(m: re.Match) -> str:
        return m.group(0) if m.group(1) == "reportgen" else f'"{m.group(1)}": "{PLACEHOLDER}"'

    return '"versions": {' + _JSON_ENTRY.sub(entry, block.group(1)) + "}"


def _html_versions(block: re.Match) -> str:
    named = [entry.partition(" ") for entry in block.group(1).split(", ")]
    listed = ", ".join(f"{n} {v if n == 'reportgen' else PLACEHOLDER}" for n, _, v in named)
    return f"<dt>Versions</dt><dd>{listed}</dd>"


def scrub(name: str, data: bytes) -> bytes:
    """``data`` with every version string other than reportgen's replaced by the placeholder, and
    the hash in the name of a figure drawn from the images' numbers (whose last float digits may
    differ between machines, as the numbers' tolerance allows) by another."""
    text = data.decode("utf-8")
    if name == "results.json":
        text = _JSON_VERSIONS.sub(_json_versions, text)
    elif name.endswith(".html"):
        text = _HTML_VERSIONS.sub(_html_versions, text)
    return _DATA_HASHED.sub(r"\1.HASH.png", text).encode("utf-8")


def _numbers(data: bytes) -> tuple[str, list[tuple[float, int]]]:
    """The text with every decimal number replaced by ``#``, and the numbers with their decimals."""
    text = data.decode("utf-8")
    found = [(float(m.group(0)), len(m.group(1))) for m in _DECIMAL.finditer(text)]
    return _DECIMAL.sub("#", text), found


def same(gold: bytes | None, actual: bytes | None) -> bool:
    """Equal text, and every decimal number within its tolerance (see the module docstring)."""
    if gold is None or actual is None:
        return gold is actual
    (gold_text, gold_numbers), (actual_text, actual_numbers) = _numbers(gold), _numbers(actual)
    return gold_text == actual_text and all(
        abs(g - a) <= max(NUMBER_TOLERANCE * max(1.0, abs(g)), 10.0 ** -digits) + 1e-12
        for (g, digits), (a, _) in zip(gold_numbers, actual_numbers)
    )


def _display_lines(name: str, data: bytes) -> list[str]:
    """Lines for the diff: results.json is a few very long lines, so it is shown indented."""
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".json"):
        try:
            text = json.dumps(json.loads(text), indent=1, ensure_ascii=False)
        except ValueError:
            pass
    return [line[:LINE_WIDTH] for line in text.splitlines()]


def first_diff(name: str, gold: bytes | None, actual: bytes | None) -> str:
    """A short unified diff of one file (gold -> actual), at most DIFF_LINES lines."""
    if gold is None:
        return f"{name}: not in the gold (new in the build)"
    if actual is None:
        return f"{name}: in the gold but not written by the build"
    old, new = _display_lines(name, gold), _display_lines(name, actual)
    if old == new:  # the difference is invisible once re-indented (whitespace, key spacing)
        old, new = gold.decode(errors="replace").splitlines(), actual.decode(errors="replace").splitlines()
        old, new = [line[:LINE_WIDTH] for line in old], [line[:LINE_WIDTH] for line in new]
    diff = list(difflib.unified_diff(old, new, f"gold/{name}", f"actual/{name}", n=2, lineterm=""))
    more = len(diff) - DIFF_LINES
    return "\n".join(diff[:DIFF_LINES] + ([f"... ({more} more diff lines)"] if more > 0 else []))


def _scrubbed(files: dict[str, bytes], name: str) -> bytes | None:
    return scrub(name, files[name]) if name in files else None


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


@pytest.fixture(scope="module")
def sample_site(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("golden") / "site")


def test_sample_site_matches_the_gold(sample_site, tmp_path):
    actual = compared_files(sample_site)
    if os.environ.get("REPORTGEN_UPDATE_GOLDEN"):
        shutil.rmtree(GOLD, ignore_errors=True)
        write_files(GOLD, actual)
        pytest.skip(f"gold rewritten in {GOLD.relative_to(REPO)}; review it with git diff")
    gold = read_gold()
    differ = [n for n in sorted(gold.keys() | actual.keys()) if not same(_scrubbed(gold, n), _scrubbed(actual, n))]
    if differ:
        saved = Path(os.environ.get("REPORTGEN_GOLDEN_ACTUAL") or tmp_path / "actual")
        write_files(saved, actual)
        first = differ[0]
        pytest.fail(
            f"{len(differ)} file(s) differ from {GOLD.relative_to(REPO)}: {', '.join(differ)}\n"
            f"actual files written to {saved}\n"
            f"if the change is intended, update the gold: {UPDATE_COMMAND}\n\n"
            + first_diff(first, gold.get(first), actual.get(first)),
            pytrace=False,
        )


def test_gold_placeholders_cover_the_third_party_versions():
    # The scrub must find the versions in the gold, or a machine with other versions fails.
    gold = read_gold()
    results = json.loads(gold["results.json"])
    others = sorted(set(results["versions"]) - {"reportgen"})
    assert others, "results.json lists no third-party versions"
    scrubbed = json.loads(scrub("results.json", gold["results.json"]))
    assert scrubbed["versions"] == {**{n: PLACEHOLDER for n in others}, "reportgen": results["versions"]["reportgen"]}
    (listed,) = _HTML_VERSIONS.findall(scrub("index.html", gold["index.html"]).decode())
    expected = (f"{n} {v if n == 'reportgen' else PLACEHOLDER}" for n, v in sorted(results["versions"].items()))
    assert listed == ", ".join(expected)


def test_numbers_are_compared_within_their_last_digit_and_nothing_else_is():
    assert same(b'<td data-sort="0.933939">0.934</td>', b'<td data-sort="0.933938">0.935</td>')
    assert not same(b'<td data-sort="0.933939">0.934</td>', b'<td data-sort="0.933909">0.934</td>')
    assert not same(b'<td data-sort="0.933939">0.934</td>', b'<td data-sort="0.933939">0.936</td>')
    assert not same(b'"spearman": 0.5, "top": 1', b'"spearman": 0.5, "top": 2')  # integers exactly
    assert not same(b'"label": "cup"', b'"label": "cap"') and not same(b"x", None)


def test_two_cold_builds_are_byte_identical(sample_site, tmp_path):
    # The golden test rests on this: every file, figures and the status file included.
    again = build_sample(tmp_path / "again")
    assert site_files(again) == site_files(sample_site)
    differ = [n for n in site_files(again) if (again / n).read_bytes() != (sample_site / n).read_bytes()]
    assert differ == []
