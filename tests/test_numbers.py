"""The numbers the site publishes: their precision in results.json, undefined entropies, the
top-10% overlap of tied maps, the rollout's provenance and boxes on downscaled images.

Expected values are worked out by hand in the comments, never taken from the code under test.
"""

from __future__ import annotations

import json

import numpy as np

from reportgen.site.pages import results_json
from reportgen.site.records import plain


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
