"""The numbers the site publishes: their precision in results.json, undefined entropies, the
top-10% overlap of tied maps, the rollout's provenance and boxes on downscaled images.

Expected values are worked out by hand in the comments, never taken from the code under test.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_MODEL, write_manifest, write_photo
from sitecheck import disagreements

from reportgen import Explainer
from reportgen.cache import STATUS_FILE
from reportgen.cli import main
from reportgen.experiments import Entropy
from reportgen.methods import rollout as rollout_module
from reportgen.methods.maths import entropy, normalised_entropy
from reportgen.site.pages import results_json
from reportgen.site.records import plain

DASH = "\u2013"


def _through_results_json(value):
    return json.loads(results_json({"images": [{"value": plain(value)}]}))["images"][0]["value"]


def test_small_and_large_values_keep_a_relative_precision_of_1e_6():
    for value in (0.0021234567, 2.1234567e-9, 123456789.123, 98765.4321, -0.0031415926, np.float32(0.0021234567)):
        back = _through_results_json(value)
        assert abs(back - float(value)) <= 1e-6 * abs(float(value)), (value, back)


def test_rounding_is_to_seven_significant_digits_and_integers_stay_integers():
    # 0.0021234567 to 7 significant digits is 0.002123457; 123456789.123 is 123456800.
    assert _through_results_json(0.0021234567) == 0.002123457
    assert _through_results_json(123456789.123) == 123456800.0
    assert _through_results_json([1, np.int64(7), 0.5]) == [1, 7, 0.5]
    assert isinstance(_through_results_json(np.int64(7)), int)
    assert "0.002123457," in results_json({"images": [{"a": plain(0.0021234567), "b": 1}]})


# --------------------------------------------------------------------------------------------
# All-zero maps have no entropy.
# --------------------------------------------------------------------------------------------


def test_a_map_with_no_positive_weight_has_no_entropy():
    zero = torch.zeros(5, dtype=torch.float64)
    negative = torch.tensor([-1.0, 0.0, -0.5], dtype=torch.float64)
    assert math.isnan(entropy(zero).item()) and math.isnan(normalised_entropy(zero).item())
    assert math.isnan(entropy(negative).item()) and math.isnan(normalised_entropy(negative).item())
    # Row by row: (0, 0), then (1, 1) with H = ln 2 (normalised 1), then (0, 3) with H = 0.
    rows = normalised_entropy(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64))
    assert math.isnan(rows[0].item()) and rows[1].item() == pytest.approx(1.0) and rows[2].item() == 0.0
    assert Entropy.of(np.zeros((4, 4))) == Entropy(nats=None, normalised=None)
    # One positive patch among zeros is a defined, one-hot distribution: entropy 0.
    one = np.zeros((4, 4))
    one[1, 2] = 0.3
    assert Entropy.of(one) == Entropy(nats=0.0, normalised=0.0)


@pytest.fixture
def zero_rollout(monkeypatch):
    """The rollout method made to give an all-zero map (as a degenerate model could)."""
    maps = rollout_module.RolloutMethod.maps

    def zero_maps(self, forward, layout):
        out = maps(self, forward, layout)
        out.maps["rollout"] = np.zeros_like(out.maps["rollout"])
        return out

    monkeypatch.setattr(rollout_module.RolloutMethod, "maps", zero_maps)


def _spans(page: str, path: str) -> list[str]:
    return re.findall(r'data-json="' + re.escape(path) + r'">([^<]*)<', page)


def test_an_all_zero_map_is_null_in_results_json_a_dash_on_the_pages_and_cached(tmp_path, zero_rollout):
    write_photo(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "results.json").read_text())["images"][0]
    rolled = record["rollout"]
    assert rolled["rollout_entropy"] == {"nats": None, "normalised": None}
    assert rolled["entropy_change"] is None
    assert rolled["raw_entropy"]["normalised"] > 0  # the raw map is a real distribution
    page = (out / record["page"]).read_text()
    assert _spans(page, "images.0.rollout.rollout_entropy.normalised") == [DASH]
    assert _spans(page, "images.0.rollout.rollout_entropy.nats") == [DASH]
    index = (out / "index.html").read_text()
    assert _spans(index, "images.0.rollout.rollout_entropy.normalised") == [DASH, DASH]  # card, table
    assert _spans(index, "images.0.rollout.entropy_change") == [DASH]
    # The table cell has no sort key, so the sort script puts it last (it also knows the dash).
    cell = re.search(r'<td([^>]*)><span class="num" data-json="images\.0\.rollout\.entropy_change"', index)
    assert cell and "data-sort" not in cell.group(1)
    assert '"\\u2013"' in next((out / "assets").glob("report.*.js")).read_text()
    checked, problems = disagreements(out)
    assert checked and not problems, problems
    # The cache's schema accepts the nulls: an unchanged rebuild reuses the image.
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert again.exit_code == 0 and "1 unchanged" in again.output and "recomputed" not in again.output, again.output
    # Half an entropy is refused as the cache's input: the image is recomputed, with a warning.
    status_file = out / STATUS_FILE
    status = json.loads(status_file.read_text())
    (entry,) = status["entries"].values()
    entry["record"]["rollout"]["rollout_entropy"]["nats"] = 1.0
    status_file.write_text(json.dumps(status))
    tampered = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out)])
    assert tampered.exit_code == 0 and "rollout_entropy" in tampered.output and "recomputed" in tampered.output
    assert json.loads((out / "results.json").read_text())["images"][0]["rollout"]["rollout_entropy"]["nats"] is None


def test_the_api_gives_none_for_an_all_zero_map(tmp_path, zero_rollout):
    tiny = dict(pretrained=False, input_size=TINY_MODEL["input_size"], options=TINY_MODEL["options"], device="cpu")
    result = Explainer(TINY_MODEL["name"], **tiny).explain(write_photo(tmp_path / "a.png"))
    assert result.entropy["rollout"].nats is None and result.entropy["rollout"].normalised is None
    assert result.entropy["attention/mean"].normalised is not None
    titles = [a.get_title() for a in result.figure().axes]
    assert "rollout (entropy undefined)" in titles
