"""The site in a real browser: headless Chromium opens pages from file:// with no errors.

Needs Debian's chromium and chromium-driver (.ci/run installs them). Without them the test is
skipped locally, but fails under CI (CI=true), where a skip would hide a missing install step.
"""

import json
import os
import re
import shutil
from pathlib import Path

import html5lib
import pytest
from click.testing import CliRunner
from conftest import write_manifest, write_photo

from reportgen.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    write_photo(folder / "one.png", (48, 40), seed=1)
    write_photo(folder / "two.jpg", (64, 36), seed=2)
    write_photo(folder / "three.png", (40, 48), seed=3)
    (folder / "broken.png").write_bytes(b"")  # fails: its card and summary row say why
    manifest = write_manifest(
        folder,
        [{"path": "one.png", "id": "one", "title": "One <b>bold</b>"},
         {"path": "broken.png", "id": "broken", "title": "Broken"},
         {"path": "two.jpg", "id": "two", "kind": "multi",
          "objects": [{"label": "a", "box": [0, 0, 30, 30]}, {"label": "b", "box": [20, 4, 60, 34]},
                      {"label": "c", "box": [44, 0, 64, 20]}]},
         {"path": "three.png", "id": "three", "title": "Three"}],
    )
    out = folder / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 3, result.output  # written, with one failed image
    assert "broken.png" in result.output
    return out


def test_pages_are_valid_html5(site):
    parser = html5lib.HTMLParser(strict=True)
    for page in sorted(site.glob("*.html")):
        parser.parse(page.read_bytes())  # raises on any parse error


def test_headings_descend_one_level_at_a_time(site):
    import re

    for page in sorted(site.glob("*.html")):
        levels = [int(h) for h in re.findall(r"<h([1-6])[\s>]", page.read_text())]
        assert levels[0] == 1 and levels.count(1) == 1, page.name
        for before, after in zip(levels, levels[1:]):
            assert after <= before + 1, f"{page.name}: h{before} followed by h{after}"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver must be installed in CI (.ci/run installs them)")
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--allow-file-access-from-files", "--window-size=1280,2000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


BROKEN_IMAGES = "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"
FAILED_RESOURCES = (
    "return performance.getEntriesByType('resource')"
    ".filter(e => e.responseStatus >= 400 || (e.transferSize === 0 && e.decodedBodySize === 0 && e.initiatorType !== 'other'))"
    ".map(e => e.name)"
)


def _open(browser, page: Path):
    browser.get(page.as_uri())
    # Lazy images below the fold would never load in a screenshot-sized window: load them all.
    browser.set_script_timeout(30)
    browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "var images = Array.from(document.images);"
        "images.forEach(i => { i.loading = 'eager'; });"
        "Promise.all(images.map(i => i.decode().catch(() => null))).then(() => done());"
    )
    return [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_index_and_pages_load_without_errors_in_chromium(site, browser, tmp_path):
    for name in ("index.html", "one.html", "two.html"):
        errors = _open(browser, site / name)
        browser.save_screenshot(str(tmp_path / f"{name}.png"))
        assert errors == [], f"{name}: console errors or failed loads {errors}"
        assert browser.execute_script(BROKEN_IMAGES) == [], name
        assert browser.execute_script(FAILED_RESOURCES) == [], name
    assert (tmp_path / "index.html.png").stat().st_size > 0


# Draws an image (a data: URL, so the canvas may be read back) and returns its RGBA bytes.
DECODED_PIXELS = (
    "var done = arguments[arguments.length - 1], image = new Image();"
    "image.onload = () => { var c = document.createElement('canvas'); c.width = image.naturalWidth;"
    " c.height = image.naturalHeight; var g = c.getContext('2d'); g.drawImage(image, 0, 0);"
    " done([c.width, c.height, Array.from(g.getImageData(0, 0, c.width, c.height).data)]); };"
    "image.onerror = () => done(null); image.src = arguments[0];"
)


def test_chromium_decodes_each_sprite_to_the_pixels_written(site, browser):
    """The sprites and the token map (palette and RGB PNGs written by reportgen, not Pillow):
    Chromium draws the same pixels as Pillow reads from the files."""
    import base64

    import numpy as np
    from PIL import Image

    _open(browser, site / "one.html")
    for name in ("explorer.png", "patches.png", "tokens.png", "maps.png"):
        path = site / "figures" / "one" / name
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        decoded = browser.execute_async_script(DECODED_PIXELS, url)
        assert decoded is not None, name
        width, height, data = decoded
        expected = np.asarray(Image.open(path).convert("RGBA"))
        assert (height, width) == expected.shape[:2], name
        np.testing.assert_array_equal(np.array(data, dtype=np.uint8).reshape(height, width, 4), expected, err_msg=name)


def test_explorer_steps_through_layers_and_heads(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(browser, site / "two.html")
    root = browser.find_element(By.CSS_SELECTOR, ".explorer")
    assert root.find_element(By.CSS_SELECTOR, ".controls").is_displayed()  # the script revealed them
    Select(root.find_element(By.NAME, "map")).select_by_value("h2")
    browser.execute_script(
        "var s = arguments[0]; s.value = 1; s.dispatchEvent(new Event('input'));",
        root.find_element(By.NAME, "layer"),
    )
    sprite = root.find_element(By.CSS_SELECTOR, ".tile img")
    assert sprite.get_attribute("src").endswith("/explorer.png")
    # Where the sprite sits in its clipping box, in units of the box: value h2 (head 3) is column 2 of
    # 3 heads + mean + rollout + token norms, layer 1 is row 0 of 2; the box covers the model
    # input exactly.
    geometry = browser.execute_script(
        "var s = arguments[0], box = s.parentNode.getBoundingClientRect(), r = s.getBoundingClientRect(),"
        " base = s.parentNode.parentNode.querySelector('img.base').getBoundingClientRect();"
        " return [s.complete, s.naturalWidth, s.naturalHeight, (r.left - box.left) / box.width,"
        " (r.top - box.top) / box.height, r.width / box.width, r.height / box.height,"
        " box.width / base.width, box.height / base.height];",
        sprite,
    )
    assert geometry[:3] == [True, 6 * 4, 2 * 4]  # a 4x4 patch grid per tile
    assert geometry[3:] == pytest.approx([-2, 0, 6, 2, 1, 1], abs=1e-3)
    # Column 2 is the third head: heads are numbered from 1, as layers are.
    assert sprite.get_attribute("alt") == "Layer 1 of 2: CLS attention of head 3"
    assert "Layer 1 of 2: CLS attention of head 3" in root.text
    Select(root.find_element(By.NAME, "map")).select_by_value("c5")  # the token norms' column
    assert sprite.get_attribute("alt") == "Layer 1 of 2: token norms entering this layer"
    left = browser.execute_script("var s = arguments[0]; return (s.getBoundingClientRect().left"
                                  " - s.parentNode.getBoundingClientRect().left) / s.parentNode.getBoundingClientRect().width;", sprite)
    assert left == pytest.approx(-5, abs=1e-3)


# Where the patch sprite sits in its clipping box, in units of the box: [left, top] (minus the
# chosen patch's tile column and tile row).
PATCH_TILE = (
    "var s = arguments[0].querySelector('.tile img'), box = s.parentNode.getBoundingClientRect(),"
    " r = s.getBoundingClientRect(); return [(r.left - box.left) / box.width, (r.top - box.top) / box.height];"
)


def test_patch_explorer_shows_the_clicked_patch_at_each_layer(site, browser):
    """one.png on the 4 x 4 grid of a 2-layer model: the sprite holds, per layer, a 4 x 4 block of
    tiles; the tile of patch (r, c) at layer l is at column c, row (l - 1) * 4 + r."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    assert _open(browser, site / "one.html") == []
    explorer = browser.find_element(By.CSS_SELECTOR, ".explorer")
    root = explorer.find_element(By.CSS_SELECTOR, ".patch-view")
    assert root.find_element(By.CSS_SELECTOR, ".patch-grid").is_displayed()  # the script revealed the grid ...
    assert not browser.find_element(By.CSS_SELECTOR, ".patch-static-note").is_displayed()  # ... hid the no-script note
    assert browser.find_element(By.CSS_SELECTOR, ".patch-help").is_displayed()  # ... and showed how to choose
    buttons = root.find_elements(By.CSS_SELECTOR, ".patch-grid button")
    assert len(buttons) == 16
    sprite = root.find_element(By.CSS_SELECTOR, ".tile img")
    assert sprite.get_attribute("src").endswith("/figures/one/patches.png")
    assert browser.execute_script("var s = arguments[0]; return [s.naturalWidth, s.naturalHeight];", sprite) == [16, 32]
    # At first: the centre patch (row 3, column 3 from 1) in the last layer.
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([-2, -(4 + 2)], abs=1e-3)
    assert [b.get_attribute("aria-pressed") for b in buttons].index("true") == 2 * 4 + 2
    stage = root.find_element(By.CSS_SELECTOR, ".patch-stage")
    before = stage.screenshot_as_png

    # A real click at the middle of the patch in row 1, column 4 of the image.
    grid = root.find_element(By.CSS_SELECTOR, ".patch-grid")
    width, height = grid.size["width"], grid.size["height"]
    ActionChains(browser).move_to_element_with_offset(grid, int(width * (3.5 / 4 - 0.5)), int(height * (0.5 / 4 - 0.5))).click().perform()
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([-3, -(4 + 0)], abs=1e-3)
    text = "Layer 2 of 2: where the patch at row 1, column 4 attends, mean over heads"
    assert sprite.get_attribute("alt") == text and text in root.text
    assert stage.screenshot_as_png != before  # another tile is drawn over the image
    assert browser.switch_to.active_element == buttons[3]

    # The keyboard: arrows move the chosen patch (clamped at the edges), Home and End along the row.
    focused = browser.switch_to.active_element
    focused.send_keys("\ue015", "\ue012", "\ue012")  # down, left, left
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([-1, -(4 + 1)], abs=1e-3)
    browser.switch_to.active_element.send_keys("\ue011")  # Home
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([0, -(4 + 1)], abs=1e-3)
    browser.switch_to.active_element.send_keys("\ue012", "\ue013")  # left (already at the edge), up
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([0, -(4 + 0)], abs=1e-3)
    browser.switch_to.active_element.send_keys("\ue010")  # End
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([-3, -(4 + 0)], abs=1e-3)
    assert browser.switch_to.active_element == buttons[3]
    assert [b.get_attribute("tabindex") for b in buttons].count("0") == 1  # one tab stop in the grid

    # The explorer's one layer slider: the same patch in layer 1.
    browser.execute_script(
        "var s = arguments[0]; s.value = 1; s.dispatchEvent(new Event('input'));",
        explorer.find_element(By.NAME, "layer"),
    )
    assert browser.execute_script(PATCH_TILE, root) == pytest.approx([-3, 0], abs=1e-3)
    assert sprite.get_attribute("alt") == "Layer 1 of 2: where the patch at row 1, column 4 attends, mean over heads"
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []


def test_explorer_with_the_keyboard_one_slider_moves_both_views(site, browser):
    """The merged explorer from the keyboard alone: Tab goes from the layer slider to the menu and on
    to the chosen patch (the grid's one tab stop); the arrow keys on the slider move both views to
    another layer, and the menu changes only the first view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    assert _open(browser, site / "one.html") == []
    explorer = browser.find_element(By.CSS_SELECTOR, ".explorer")
    slider, menu = explorer.find_element(By.NAME, "layer"), explorer.find_element(By.NAME, "map")
    first, second = explorer.find_element(By.CSS_SELECTOR, ".explorer-label"), explorer.find_element(By.CSS_SELECTOR, ".patch-label")
    view = explorer.find_element(By.CSS_SELECTOR, ".patch-view")
    buttons = view.find_elements(By.CSS_SELECTOR, ".patch-grid button")
    browser.execute_script("arguments[0].focus()", slider)
    slider.send_keys(Keys.ARROW_LEFT)  # layer 2 -> 1
    assert first.text == "Layer 1 of 2: CLS attention, mean over heads"
    assert second.text == "Layer 1 of 2: where the patch at row 3, column 3 attends, mean over heads"
    assert browser.execute_script(PATCH_TILE, view) == pytest.approx([-2, -2], abs=1e-3)  # layer 1's block, row 2
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element == menu
    menu.send_keys(Keys.ARROW_DOWN)  # mean over heads -> head 1
    assert first.text == "Layer 1 of 2: CLS attention of head 1"
    assert second.text == "Layer 1 of 2: where the patch at row 3, column 3 attends, mean over heads"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element == buttons[2 * 4 + 2]  # the chosen patch, the grid's tab stop
    browser.switch_to.active_element.send_keys(Keys.ARROW_UP, Keys.ARROW_RIGHT)
    assert second.text == "Layer 1 of 2: where the patch at row 2, column 4 attends, mean over heads"
    assert browser.execute_script(PATCH_TILE, view) == pytest.approx([-3, -1], abs=1e-3)
    assert first.text == "Layer 1 of 2: CLS attention of head 1"  # the first view stays
    browser.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)  # back to the menu, then the slider
    browser.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    assert browser.switch_to.active_element == slider
    slider.send_keys(Keys.ARROW_RIGHT)
    assert first.text == "Layer 2 of 2: CLS attention of head 1"
    assert second.text == "Layer 2 of 2: where the patch at row 2, column 4 attends, mean over heads"
    assert browser.execute_script(PATCH_TILE, view) == pytest.approx([-3, -(4 + 1)], abs=1e-3)


def test_explorer_says_when_a_layer_of_the_patches_is_not_kept(tmp_path, browser):
    """On a 25 x 25 grid only the last layer of where each patch attends is kept: at an earlier
    layer of the slider the second view shows the input alone and says so."""
    from selenium.webdriver.common.by import By

    write_photo(tmp_path / "big.png", (200, 200), seed=5)
    model = {"name": "vit_tiny_patch16_224", "pretrained": False, "input_size": 200,
             "options": {"patch_size": 8, "depth": 2, "embed_dim": 24, "num_heads": 3}}
    manifest = write_manifest(tmp_path, [{"path": "big.png", "id": "big"}], model=model)
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _open(browser, tmp_path / "site" / "big.html") == []
    explorer = browser.find_element(By.CSS_SELECTOR, ".explorer")
    view = explorer.find_element(By.CSS_SELECTOR, ".patch-view")
    tile = view.find_element(By.CSS_SELECTOR, ".tile")
    label = view.find_element(By.CSS_SELECTOR, ".patch-label")
    assert tile.is_displayed() and label.text == "Layer 2 of 2: where the patch at row 13, column 13 attends, mean over heads"
    browser.execute_script("var s = arguments[0]; s.value = 1; s.dispatchEvent(new Event('input'));",
                           explorer.find_element(By.NAME, "layer"))
    assert not tile.is_displayed()
    assert label.text == "Layer 1 of 2: where the patch at row 13, column 13 attends is kept for the last layer only"
    assert explorer.find_element(By.CSS_SELECTOR, ".explorer-label").text == "Layer 1 of 2: CLS attention, mean over heads"


def test_patch_explorer_without_javascript_shows_the_static_panels(site):
    """The page as written: the controls and the patch grid hidden until the script reveals them,
    both views showing the last layer (the second the centre patch, outlined), a note saying so,
    and static panels of the last layer whose tiles are the patches they name."""
    page = html5lib.parse((site / "one.html").read_text(), namespaceHTMLElements=False)
    section = next(s for s in page.iter("section") if s.get("aria-labelledby") == "explorer-heading")
    classes = {}
    for e in section.iter():
        classes.setdefault(e.get("class"), e)  # the first of each class: the views come before the panels
    assert classes["controls"].get("hidden") is not None
    assert classes["patch-grid"].get("hidden") is not None
    assert classes["note patch-help"].get("hidden") is not None
    assert "".join(classes["patch-label"].itertext()) == "Layer 2 of 2: where the patch at row 3, column 3 attends, mean over heads"
    assert "".join(classes["explorer-label"].itertext()) == "Layer 2 of 2: CLS attention, mean over heads"
    marker = classes["patch-marker"].get("style")
    assert "left: 50.0%; top: 50.0%; width: 25.0%; height: 25.0%" in marker
    assert "needs JavaScript" in "".join(classes["note patch-static-note"].itertext())
    assert classes["note patch-static-note"].get("hidden") is None
    figures = [f for f in classes["figures picks"].iter("figure")]
    assert len(figures) == 5
    for figure in figures:
        caption = "".join(figure.find("figcaption").itertext())
        r, c = (int(v) - 1 for v in re.findall(r"\d+", caption))
        style = next(i for i in figure.iter("img") if i.get("class") == "sprite").get("style")
        assert f"left: -{c * 100}%; top: -{(4 + r) * 100}%" in style, caption  # layer 2's block


SIMILARITY = (
    "return Array.from(document.querySelectorAll('table.similarity')).map(t => ({"
    " caption: t.caption.firstChild.textContent.trim(),"
    " sort: Array.from(t.tHead.rows[0].cells).map(c => c.getAttribute('aria-sort')),"
    " rows: Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => {"
    "   var s = getComputedStyle(c); return [c.textContent.trim(), s.backgroundColor, s.color]; }))}));"
)


def _css_rgb(text):
    return [float(v) for v in re.findall(r"[\d.]+", text)[:3]]


def _wcag_contrast(a, b):
    def luminance(rgb):
        c = [v / 255 for v in rgb]
        c = [v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_similarity_tables_are_coloured_by_value_and_sort_by_a_column(site, browser):
    """two.html's three objects: each cell's background shades from white (0) to red (the
    bound) with its value and its text contrasts at least 4.5:1; clicking a column's header (a
    button) sorts the rows by it, again reverses them, and Enter on "Object" restores the order."""
    from selenium.webdriver.common.by import By

    assert _open(browser, site / "two.html") == []
    record = next(i for i in json.loads((site / "results.json").read_text())["images"] if i["id"] == "two")
    objects = record["objects"]
    labels = objects["labels"]
    tables = browser.execute_script(SIMILARITY)
    assert [t["caption"] for t in tables] == ["Plain", "Rollout-weighted", "Rollout \u2212 plain"]
    white, red, blue = [247, 247, 247], [178, 24, 43], [33, 102, 172]
    for table, matrix, bound in zip(tables, (objects["plain_similarity"], objects["rollout_similarity"], objects["difference"]),
                                    (1.0, 1.0, max(abs(v) for row in objects["difference"] for v in row))):
        assert [r[0][0] for r in table["rows"]] == labels
        for i, row in enumerate(table["rows"]):
            for j, (text, background, ink) in enumerate(row[1:]):
                value = matrix[i][j]
                assert text == f"{value:.3f}"
                # The scale by hand: halfway to either end is ColorBrewer's lighter shade.
                t = min(abs(value) / bound, 1.0)
                far = red if value >= 0 else blue
                near = [244, 165, 130] if value >= 0 else [146, 197, 222]
                expected = [w + 2 * t * (n - w) for w, n in zip(white, near)] if t <= 0.5 else \
                    [n + (2 * t - 1) * (f - n) for n, f in zip(near, far)]
                assert _css_rgb(background) == pytest.approx(expected, abs=0.6), (table["caption"], i, j)
                assert _wcag_contrast(_css_rgb(background), _css_rgb(ink)) >= 4.5, (table["caption"], i, j, ink)
    assert tables[0]["rows"][0][1][2] == "rgb(255, 255, 255)"  # white on the diagonal's dark red

    plain = browser.find_element(By.CSS_SELECTOR, "table.similarity")
    buttons = plain.find_elements(By.CSS_SELECTOR, "thead th button.sort")
    assert [b.text for b in buttons] == ["Object", *labels]
    column = 1  # object "b": rows by their similarity to b
    by_b = sorted(range(len(labels)), key=lambda i: objects["plain_similarity"][i][column])

    def order():
        return [r[0][0] for r in browser.execute_script(SIMILARITY)[0]["rows"]]

    buttons[1 + column].click()
    assert order() == [labels[i] for i in by_b]
    assert browser.execute_script(SIMILARITY)[0]["sort"] == [None, None, "ascending", None]
    buttons[1 + column].click()
    assert order() == [labels[i] for i in reversed(by_b)]
    assert browser.execute_script(SIMILARITY)[0]["sort"][2] == "descending"
    # The cells moved with their rows: each still shows its value in its own colour.
    table = browser.execute_script(SIMILARITY)[0]
    for row in table["rows"]:
        i = labels.index(row[0][0])
        assert [cell[0] for cell in row[1:]] == [f"{v:.3f}" for v in objects["plain_similarity"][i]]
    # The keyboard: the headers are buttons in the tab order; Enter on "Object" restores the order.
    buttons[0].send_keys("\ue007")
    assert order() == labels and browser.switch_to.active_element == buttons[0]
    assert browser.find_element(By.CSS_SELECTOR, ".sort-hint").is_displayed()
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []


def test_similarity_tables_without_javascript_are_static_and_coloured(site):
    """The page as written: plain header cells (the script makes them buttons), the sorting hint
    hidden, and every cell's colour in its own style, so the table reads the same without it."""
    page = html5lib.parse((site / "two.html").read_text(), namespaceHTMLElements=False)
    tables = [t for t in page.iter("table") if "similarity" in (t.get("class") or "")]
    assert len(tables) == 3
    for table in tables:
        assert not list(table.iter("button"))
        cells = [td for td in table.iter("td")]
        assert len(cells) == 9 and all(re.fullmatch(r"--heat: rgb\([\d.]+ [\d.]+ [\d.]+\)", td.get("style")) for td in cells)
    hint = next(s for s in page.iter("span") if s.get("class") == "sort-hint")
    assert hint.get("hidden") is not None


@pytest.fixture(scope="module")
def targeted_site(tmp_path_factory):
    """A multi image with a gradient method explaining two classes and each object."""
    folder = tmp_path_factory.mktemp("targeted")
    write_photo(folder / "two.jpg", (64, 36), seed=2)
    manifest = write_manifest(
        folder,
        [{"path": "two.jpg", "id": "two", "title": "Two", "kind": "multi",
          "objects": [{"label": "a <i>", "box": [0, 0, 30, 30]}, {"label": "b", "box": [20, 4, 60, 34]}]}],
        attention={"target_classes": "top-2", "object_targets": True},
        methods=["attention", "rollout", "gradcam"],
    )
    return _built(manifest, folder / "site")


def _built(manifest, out):
    """The site of ``manifest``, built at ``out`` (the build must succeed)."""
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


COMPARISON = (
    "var t = document.querySelector('table.comparison');"
    " return [Array.from(t.tHead.rows[0].cells).map(c => c.textContent.trim()),"
    " Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => {"
    "   var i = c.querySelector('img.sprite'); if (!i) { return c.tagName === 'TH' ? c.textContent.trim() : null; }"
    "   var box = i.parentNode.getBoundingClientRect(), at = i.getBoundingClientRect();"
    "   return [i.getAttribute('src'), i.complete && i.naturalWidth > 0, Math.round(c.getBoundingClientRect().left),"
    "           (at.left - box.left) / box.width]; }))];"
)


def test_comparison_grid_lines_up_each_kind_of_map(targeted_site, browser):
    """Rows: the methods; columns: the main map, attention's max, the second class target, each
    object; each cell the tile of that method's map of that kind (as results.json names its
    figure) over the model input, loaded, and the cells of one column one above the other."""
    assert _open(browser, targeted_site / "two.html") == []
    headers, rows = browser.execute_script(COMPARISON)
    assert headers == ["Method", "Main map", "attention/max", "Target 2", "Object 1: a <i>", "Object 2: b"]
    figures = json.loads((targeted_site / "results.json").read_text())["images"][0]["figures"]
    expected = {
        "attention": ["cls_mean", "cls_max", None, None, None],
        "rollout": ["rollout", None, None, None, None],
        "gradcam": ["gradcam", None, "gradcam_t2", "gradcam_o1", "gradcam_o2"],
    }
    assert [row[0] for row in rows] == list(expected)
    lefts = {}
    for row in rows:
        for column, (cell, key) in enumerate(zip(row[1:], expected[row[0]])):
            if key is None:
                assert cell is None, (row[0], column)
                continue
            src, loaded, left, shift = cell
            layout = figures["overlays"]
            assert src == layout["sprite"] and loaded, (row[0], column)
            # The sprite is shifted left by the tiles before this map's and its gutter.
            w, g = layout["tile_width"], layout["gutter"]
            assert shift == pytest.approx(-(layout["tiles"][key] * (w + 2 * g) + g) / w, abs=1e-3), (row[0], column)
            assert lefts.setdefault(column, left) == left  # one column, one x position
    assert len(lefts) == 5
    # The second class target and the objects are named in their cells.
    caption = browser.execute_script(
        "return document.querySelector('table.comparison tbody tr:last-child td:nth-child(4) figcaption').textContent")
    target = next(m for m in json.loads((targeted_site / "results.json").read_text())["images"][0]["maps"].values()
                  if m["figure"] == "gradcam_t2")["target"]
    assert caption.startswith(f"gradcam/target-2: class {target['class_index']}")


@pytest.fixture(scope="module")
def letterboxed_site(tmp_path_factory):
    """The sample photo of an espresso (600 x 400) as the offline model sees it: the longest side
    resized to 224 px, letterbox padding above and below."""
    from conftest import REPO

    folder = tmp_path_factory.mktemp("letterboxed")
    shutil.copy(REPO / "images" / "coffee.png", folder / "coffee.png")
    manifest = write_manifest(folder, [{"path": "coffee.png", "id": "coffee", "title": "Espresso"}],
                              model={"name": "imgfocus-vits14", "input_size": 224})
    return _built(manifest, folder / "site")


# Each map's tile as the page draws it: its alt text, opacity and smoothing, its clipping box
# against the model input under it (px), and the sprite's place and size in units of that box.
MAP_TILES = (
    "return Array.from(document.querySelectorAll('.stage .tile.map img')).map(s => {"
    " var box = s.parentNode.getBoundingClientRect(), r = s.getBoundingClientRect(),"
    " base = s.parentNode.parentNode.querySelector('img.base').getBoundingClientRect(), style = getComputedStyle(s);"
    " return [s.getAttribute('alt'), s.getAttribute('src'), style.opacity, style.imageRendering,"
    " [box.left - base.left, box.top - base.top, box.width - base.width, box.height - base.height],"
    " [(r.left - box.left) / box.width, (r.top - box.top) / box.height, r.width / box.width, r.height / box.height]]; })"
)


@pytest.mark.offline_model
def test_each_map_is_drawn_over_the_model_input_and_the_padding_in_greys(letterboxed_site, browser):
    """Every map on the page is its tile of the map sprite, clipped to a box that covers the model
    input exactly, at the run's opacity, smoothed; and what the browser draws is the overlay the
    map makes blended at full size (figures.overlay, from the map in results.json), and greys on
    the letterbox padding."""
    import io

    import numpy as np
    from PIL import Image

    from reportgen.site.figures import overlay

    assert _open(browser, letterboxed_site / "coffee.html") == []
    image = json.loads((letterboxed_site / "results.json").read_text())["images"][0]
    layout = image["figures"]["overlays"]
    w, h, g, count = layout["tile_width"], layout["tile_height"], layout["gutter"], len(layout["tiles"])
    tiles = browser.execute_script(MAP_TILES)
    # The comparison grid's three maps: the page draws each map once.
    keys = ["cls_mean", "cls_max", "rollout"]
    assert [t[0] for t in tiles] == ["attention/mean over Espresso", "attention/max over Espresso", "rollout over Espresso"]
    for (alt, src, opacity, rendering, box, place), key in zip(tiles, keys):
        assert src == layout["sprite"] and opacity == "0.5" and rendering == "auto", alt
        assert box == pytest.approx([0, 0, 0, 0], abs=0.5), alt
        left = -(layout["tiles"][key] * (w + 2 * g) + g) / w
        # Within half a pixel of a 9rem (144 px) cell.
        assert place == pytest.approx([left, -g / h, count * (w + 2 * g) / w, (h + 2 * g) / h], abs=0.5 / 144), alt

    # The pixels: the grid's first map against the blended overlay.
    stage = browser.find_elements("css selector", "table.comparison .stage")[0]
    shown = np.asarray(Image.open(io.BytesIO(stage.screenshot_as_png)).convert("RGB"), dtype=np.float64)
    view = Image.open(letterboxed_site / image["figures"]["input"]).convert("RGB")
    top = image["scales"]["maps"]["attention/mean"]["top"]
    blended = overlay(view, np.array(image["attention"]["cls_mean"]), "inferno", 0.5, top=top)
    expected = np.asarray(blended.resize((shown.shape[1], shown.shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)
    browser.execute_script("arguments[0].querySelector('.tile img').style.opacity = 0", stage)
    bare = np.asarray(Image.open(io.BytesIO(stage.screenshot_as_png)).convert("RGB"), dtype=np.float64)
    weights = np.array(image["content"]["weights"])[:, 0]  # each patch row's share of image
    rows = np.arange(shown.shape[0]) * len(weights) // shown.shape[0]
    image_rows, padding_rows = weights[rows] == 1, weights[rows] == 0
    assert image_rows.sum() > shown.shape[0] / 2 and padding_rows.sum() > shown.shape[0] / 10
    difference = np.abs(shown - expected)[image_rows].mean()
    assert difference < 3 and np.abs(bare - expected)[image_rows].mean() > 10 * difference
    # On the padding, a grey over the input's own (brownish) padding: half its colour, and light.
    chroma = lambda pixels: (pixels.max(axis=-1) - pixels.min(axis=-1)).mean()  # noqa: E731
    assert chroma(shown[padding_rows]) < 0.7 * chroma(bare[padding_rows])
    assert shown[padding_rows].mean() > bare[padding_rows].mean() - 5  # not the dark bottom of the colour map


def test_maps_print_over_the_model_input(site, browser):
    """Printed (as the browser prints: print media, no backgrounds), each map is still its sprite
    tile over the model input: they are images, not CSS backgrounds."""
    import base64

    _open(browser, site / "one.html")
    pdf = base64.b64decode(browser.print_page().encode()) if hasattr(browser, "print_page") else None
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        visible = browser.execute_script(
            "return Array.from(document.querySelectorAll('.stage .tile.map img')).map(s => {"
            " var r = s.parentNode.getBoundingClientRect(); return [r.width > 0 && r.height > 0, getComputedStyle(s).display,"
            " getComputedStyle(s).visibility, s.complete && s.naturalWidth > 0]; })")
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert visible and all(v[0] and v[1] != "none" and v[2:] == ["visible", True] for v in visible), visible
    assert pdf is None or pdf.startswith(b"%PDF")


def test_summary_table_sorts_without_a_server(site, browser):
    from selenium.webdriver.common.by import By

    _open(browser, site / "index.html")
    results = json.loads((site / "results.json").read_text())
    header = browser.find_elements(By.CSS_SELECTOR, "table.summary thead th button")[2]
    header.click()
    first_rows = [r.text.split("\n")[0] for r in browser.find_elements(By.CSS_SELECTOR, "table.summary tbody th")]
    ok = [i for i in results["images"] if not i["error"]]
    by_entropy = sorted(ok, key=lambda i: i["attention"]["mean_entropy"]["normalised"])
    assert first_rows[0].startswith(by_entropy[0]["title"].split(" <")[0])
    header.click()
    first_rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "table.summary tbody th")]
    assert first_rows[0].startswith(by_entropy[-1]["title"].split(" <")[0])


# What each column of the summary table shows of an image (None: nothing to sort by). A failed
# image has its title and kind, and nothing else.
SUMMARY_COLUMNS = [
    lambda i: i["title"],
    lambda i: i["kind"],
    lambda i: i["attention"]["mean_entropy"]["normalised"],
    lambda i: i["attention"]["max_entropy"]["normalised"],
    lambda i: i["rollout"]["rollout_entropy"]["normalised"],
    lambda i: i["rollout"]["entropy_change"],
    lambda i: i["rollout"]["spearman"],
    lambda i: len(i["objects"]["objects"]) if i["objects"] else None,
    lambda i: i["objects"]["mean_plain_similarity"] if i["objects"] else None,
    lambda i: i["objects"]["mean_rollout_similarity"] if i["objects"] else None,
]


def _shown(image, column):
    if image["error"] and column >= 2:
        return None
    return SUMMARY_COLUMNS[column](image)


def test_every_summary_column_sorts_with_a_failed_image(site, browser):
    """Each header, clicked once (ascending) and again (descending): no script error, the images
    that have a value in that column in order, and the rows without one (a failed image's row
    has a single wide cell) after them."""
    from selenium.webdriver.common.by import By

    _open(browser, site / "index.html")
    results = json.loads((site / "results.json").read_text())
    assert any(i["error"] for i in results["images"])  # the site really has a failed image
    by_title = {i["title"]: i for i in results["images"]}
    buttons = browser.find_elements(By.CSS_SELECTOR, "table.summary thead th button")
    assert len(buttons) == len(SUMMARY_COLUMNS)
    for column, button in enumerate(buttons):
        for ascending in (True, False):
            button.click()
            errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
            assert errors == [], f"column {column}: {errors}"
            titles = browser.execute_script(
                "return Array.from(document.querySelectorAll('table.summary tbody tr'))"
                ".map(r => r.cells[0].textContent.trim())"
            )
            assert sorted(titles) == sorted(by_title), column  # no row lost or doubled
            shown = [_shown(by_title[t], column) for t in titles]
            known = [v for v in shown if v is not None]
            assert shown == known + [None] * (len(shown) - len(known)), f"column {column}: {titles}"
            key = str.lower if column < 2 else None
            assert known == sorted(known, key=key, reverse=not ascending), f"column {column}: {titles}"
            assert button.find_element(By.XPATH, "..").get_attribute("aria-sort") == ("ascending" if ascending else "descending")


def test_exported_svg_opens_in_chromium(site, browser, tmp_path):
    """The print figure of ``reportgen export`` as a browser shows it: the SVG opened by itself
    (an SVG document, no errors, its embedded images decoded) and as an <img> of a page."""
    svg = tmp_path / "two.svg"
    result = CliRunner().invoke(main, ["export", str(site), "--image", "two", "--format", "svg", "-o", str(svg)])
    assert result.exit_code == 0, result.output
    browser.get(svg.as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    root = browser.execute_script("var r = document.documentElement, b = r.getBBox(); return [r.tagName, b.width, b.height];")
    assert root[0] == "svg" and root[1] > 100 and root[2] > 100
    # Each embedded raster decodes in the browser: the model input and one overlay per map (mean,
    # max, rollout) at the model's 32 x 32 pixels, and the three maps' colour bars.
    sizes = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "var hrefs = Array.from(document.querySelectorAll('image')).map(i => i.getAttribute('xlink:href') || i.getAttribute('href'));"
        "Promise.all(hrefs.map(h => new Promise(ok => { var im = new Image(); im.onload = () => ok([im.naturalWidth, im.naturalHeight]);"
        " im.onerror = () => ok([0, 0]); im.src = h; }))).then(done);"
    )
    assert sorted(sizes).count([32, 32]) == 4, sizes
    assert len(sizes) == 4 + 3 and all(w > 0 and h > 0 for w, h in sizes), sizes
    page = tmp_path / "page.html"
    page.write_text('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>figure</title></head>'
                    '<body><img src="two.svg" alt="figure"></body></html>')
    errors = _open(browser, page)
    assert errors == [] and browser.execute_script(BROKEN_IMAGES) == []
    width = browser.execute_script("return document.images[0].naturalWidth")
    assert width == pytest.approx(float(re.search(r'width="([\d.]+)pt"', svg.read_text()).group(1)) * 4 / 3, abs=1)


@pytest.fixture(scope="module")
def evaluated_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluated")
    write_photo(folder / "one.png", (48, 40), seed=4)
    write_photo(folder / "two.png", (40, 48), seed=5)
    manifest = write_manifest(folder, [{"path": "one.png", "id": "one"}, {"path": "two.png", "id": "two"}],
                              evaluate={"random_orders": 1, "sanity": ["one"]})
    out = folder / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


SANITY = """
const section = document.getElementById('evaluation-heading').parentElement;
const heading = Array.from(section.querySelectorAll('h3')).find(h => h.textContent.startsWith('Does each map'));
if (!heading) return null;
const figure = section.querySelector('figure img[src$="sanity.png"]');
const text = heading.nextElementSibling.nextElementSibling.textContent;
return [figure.getAttribute('src'), figure.complete && figure.naturalWidth > 0, figure.getBoundingClientRect().width, text];
"""


def test_the_sanity_figure_shows_on_the_pages_that_ran_it(evaluated_site, browser):
    """The page of the checked image shows its sanity figure (loaded, as results.json names it)
    and names the flagged maps; the other image's page has neither."""
    records = {r["id"]: r for r in json.loads((evaluated_site / "results.json").read_text())["images"]}
    for page in sorted(evaluated_site.glob("*.html")):
        html5lib.HTMLParser(strict=True).parse(page.read_bytes())  # raises on any parse error
    assert _open(browser, evaluated_site / "one.html") == []
    src, loaded, width, text = browser.execute_script(SANITY)
    assert src == records["one"]["figures"]["sanity"] and loaded and width > 300
    sanity = records["one"]["evaluation"]["sanity"]
    flagged = [name for name in records["one"]["evaluation"]["maps"] if sanity["flagged"][name]]
    assert text == (f"Flagged, still above 0.5 with every block re-initialised: {', '.join(flagged)}." if flagged
                    else "No map is flagged: none stays above 0.5 once every block is re-initialised (a map that becomes constant has no rank correlation and is not flagged).")
    assert _open(browser, evaluated_site / "two.html") == []
    assert browser.execute_script(SANITY) is None and "sanity" not in records["two"]["figures"]
