"""Checks on a written site: local links resolve, nothing external, pages agree with results.json."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.numbers: list[tuple[str, str]] = []
        self.images: list[dict] = []
        self._json_path: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.links.append(a[key])
        if tag == "img":
            self.images.append(a)
        if "data-json" in a:
            self._json_path = a["data-json"]
            self._text = []

    def handle_data(self, data):
        if self._json_path is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "span" and self._json_path is not None:
            self.numbers.append((self._json_path, "".join(self._text)))
            self._json_path = None


def parse(page: Path) -> _Collector:
    collector = _Collector()
    collector.feed(page.read_text(encoding="utf-8"))
    return collector


def broken_links(site: Path) -> list[str]:
    """Every href/src in every page that is external or does not resolve to a file in the site."""
    problems = []
    for page in sorted(site.glob("*.html")):
        for link in parse(page).links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc:
                problems.append(f"{page.name}: external link {link}")
                continue
            if not parts.path:
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.is_file() or site.resolve() not in target.parents:
                problems.append(f"{page.name}: {link} does not resolve")
    return problems


def lookup(data, path: str):
    """The value at ``path``; None when a section on the way is absent (null), as a page shows it."""
    for part in path.split("."):
        if data is None:
            return None
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def disagreements(site: Path) -> tuple[int, list[str]]:
    """Compare every number shown on a page (with its data-json path) with results.json."""
    results = json.loads((site / "results.json").read_text(encoding="utf-8"))
    checked, problems = 0, []
    for page in sorted(site.glob("*.html")):
        for path, shown in parse(page).numbers:
            value = lookup(results, path)
            digits = len(shown.split(".")[1]) if "." in shown else 0
            # None shows as "n/a", or as "–" where it is an undefined entropy.
            missing = shown if shown in ("n/a", "\u2013") else "n/a"
            expected = missing if value is None else f"{value:.{digits}f}"
            checked += 1
            if shown != expected:
                problems.append(f"{page.name}: {path} shows {shown}, results.json has {value}")
    return checked, problems
