"""What the pages and the command line say, in words: numbering, grammar, wording, progress."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_MODEL, hand_attention, hand_rollout, write_manifest, write_photo

from reportgen.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden" / "sample"


def _text(page: Path) -> str:
    """The text of the page's body (what a reader sees, scripts aside), whitespace collapsed."""
    import html5lib

    body = html5lib.parse(page.read_bytes(), namespaceHTMLElements=False).find("body")
    for script in body.iter("script"):
        script.text = ""
    return re.sub(r"\s+", " ", "".join(body.itertext()))


@pytest.fixture(scope="module", params=[0, 2], ids=["cls", "cls+2 registers"])
def site(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    write_photo(folder / "one.png", (48, 40), seed=1)
    model = {**TINY_MODEL, "options": {**TINY_MODEL["options"], "reg_tokens": request.param}}
    manifest = write_manifest(folder, [{"path": "one.png", "id": "one"}], model=model)
    out = folder / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, 1 + request.param


def test_token_map_caption_counts_prefix_tokens_in_good_grammar(site):
    out, prefix = site
    text = _text(out / "one.html")
    expected = "the first is a prefix token" if prefix == 1 else f"the first {prefix} are prefix tokens"
    assert f"({16 + prefix} tokens; {expected}, marked off by white lines, then the patches row by row)" in text
    assert "the first 1 are" not in text


def test_heads_are_numbered_from_1_like_layers(site):
    out, _prefix = site
    page = (out / "one.html").read_text()
    text = _text(out / "one.html")
    # 3 heads: the entropy table and the explorer's menu say 1, 2, 3; never head 0.
    assert re.findall(r'<th scope="row">Head (\d+)</th>', page) == ["1", "2", "3"]
    assert re.findall(r'<option value="h(\d)">head (\d)</option>', page) == [("0", "1"), ("1", "2"), ("2", "3")]
    assert "head 0" not in text.lower()
    # Layers from 1 too: the last of 2 layers is layer 2.
    assert "last layer (layer 2)" in text


def test_preprocessing_is_described_in_words(site):
    out, _prefix = site
    assert "(shorter side resized, then centre-cropped)." in _text(out / "one.html")  # timm's center crop
    assert "crop)." not in _text(out / "one.html")
    # The offline model letterboxes: the sample pages (equal to a build, tests/test_golden.py) say so.
    chelsea = (GOLDEN / "chelsea.html").read_text()
    assert "(longest side resized to fit, the rest letterbox padding)." in chelsea
    assert "border crop" not in chelsea and "border crop" not in (GOLDEN / "index.html").read_text()


def test_index_states_this_runs_finding_about_rollout_and_similarity():
    """The object-pairs paragraph states how often rollout lowered the similarity in this run, and
    nothing a reader of the site could not check (no claim from elsewhere to agree with)."""
    text = _text(GOLDEN / "index.html")
    assert re.search(r"In this run, rollout weighting lowered the cosine similarity of \d+ of the \d+ object pairs "
                     r"\(0\.\d\d\)", text)
    for phrase in ("seed", "usually", "agree"):
        assert phrase not in text.lower()


def test_the_summary_line_labels_the_total_time(tmp_path):
    write_photo(tmp_path / "one.png", (48, 40), seed=1)
    manifest = write_manifest(tmp_path, [{"path": "one.png", "id": "one"}])
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(tmp_path / "site")])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("Wrote "))
    assert re.search(r"\(1 of 1 images, model loaded in \d+\.\d s, \d+\.\d s in total\)$", line), line


def test_progress_moves_per_image_as_its_figures_are_written(tmp_path):
    """One batch of four images: the model yields the four at once, but the progress moves one
    image at a time, each when that image's figures are on disk."""
    from reportgen.builder import build
    from reportgen.config import build_options, load_manifest

    for i in range(4):
        write_photo(tmp_path / f"p{i}.png", (48, 40), seed=i)
    manifest = load_manifest(write_manifest(tmp_path, [{"path": f"p{i}.png", "id": f"p{i}"} for i in range(4)]))
    out = tmp_path / "site"
    seen = []

    def progress(count):
        staging = next(tmp_path.glob(".site.building-*"))
        written = sorted(p.parent.name for p in staging.glob("figures/*/explorer.png"))
        seen.append((count, written))

    build(manifest, build_options(output=out, batch_size=4), progress=progress)
    assert [count for count, _ in seen] == [1, 1, 1, 1]
    # Figures are written in order by one writer: at the k-th step, the first k images' are there.
    assert [written for _, written in seen] == [[f"p{i}" for i in range(k + 1)] for k in range(4)]


def _hand_entropy(p) -> float:
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(p.size))


def test_layer_entropy_agrees_with_a_hand_computation_and_the_index_draws_it(tmp_path):
    """Per layer, the normalised entropy of the CLS attention (mean over heads) and of the rollout
    through that layer, recomputed here from the tiny model's qkv weights (conftest.hand_attention,
    timm's own transform, numpy); the index's seaborn figure plots their mean over the images."""
    from PIL import Image
    from timm.data import create_transform

    from reportgen.config import load_manifest
    from reportgen.model.loading import load_model
    from reportgen.site.figures import layer_entropy_figure

    for i in range(3):
        write_photo(tmp_path / f"p{i}.png", (48, 40), seed=i)
    path = write_manifest(tmp_path, [{"path": f"p{i}.png", "id": f"p{i}"} for i in range(3)])
    out = tmp_path / "site"
    assert CliRunner().invoke(main, ["build", str(path), "-o", str(out), "--quiet"]).exit_code == 0
    results = json.loads((out / "results.json").read_text())
    manifest = load_manifest(path)
    loaded = load_model(manifest.model, "cpu")  # the same seeded random weights the build used
    for entry, record in zip(manifest.images, results["images"]):
        x = create_transform(**loaded.data_config, is_training=False)(Image.open(entry.path).convert("RGB"))[None]
        attentions, _ = hand_attention(loaded.model, x)
        attention = [_hand_entropy(a[0].double().numpy().mean(axis=0)[0, 1:]) for a in attentions]
        rollout = [_hand_entropy(hand_rollout(attentions[: layer + 1])) for layer in range(len(attentions))]
        assert record["layer_entropy"]["attention"] == pytest.approx(attention, rel=1e-5)
        assert record["layer_entropy"]["rollout"] == pytest.approx(rollout, rel=1e-5)
        assert record["layer_entropy"]["attention"][-1] == record["attention"]["mean_entropy"]["normalised"]
    # The figure: one line per method at layers 1 and 2, the mean over the three images.
    index = (out / "index.html").read_text()
    figure_file = re.search(r'<img src="(assets/entropy-by-layer\.[0-9a-f]{10}\.png)"', index).group(1)
    with Image.open(out / figure_file) as png:
        assert png.format == "PNG" and png.size == (640, 360)
    figure = layer_entropy_figure(results["images"])
    lines = [line for line in figure.axes[0].lines if len(line.get_xdata()) == 2]
    assert len(lines) == 2
    for line, method in zip(lines, ("attention", "rollout")):
        expected = np.mean([r["layer_entropy"][method] for r in results["images"]], axis=0)
        assert list(line.get_xdata()) == [1, 2]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-12)
    assert "Entropy per layer" in _text(out / "index.html")
