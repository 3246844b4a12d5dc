"""Object pooling and similarity against hand-computed cases."""

import numpy as np
import pytest

from reportgen.methods.embeddings import (
    cosine_similarity_matrix,
    number_duplicates,
    patch_coverage,
    pooled_embedding,
    rollout_weights,
)

# A 2x2 grid of 4x4-pixel patches; patch tokens chosen so weighted means are easy by hand.
TOKENS = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]])


def test_box_covering_half_a_patch():
    coverage = patch_coverage((0, 0, 2, 4), grid=(2, 2), patch=(4, 4))
    assert coverage.tolist() == [[0.5, 0.0], [0.0, 0.0]]
    assert pooled_embedding(TOKENS, coverage).tolist() == [1.0, 0.0]


def test_box_straddling_patches_weights_by_area():
    # (2, 2)-(8, 8): patch 0 a quarter covered, patches 1 and 2 half, patch 3 fully.
    coverage = patch_coverage((2, 2, 8, 8), grid=(2, 2), patch=(4, 4))
    assert coverage.tolist() == [[0.25, 0.5], [0.5, 1.0]]
    # (0.25*[1,0] + 0.5*[0,1] + 0.5*[2,2] + 1*[-1,3]) / 2.25 = [0.25, 4.5] / 2.25
    assert pooled_embedding(TOKENS, coverage) == pytest.approx([0.25 / 2.25, 4.5 / 2.25])


def test_rollout_weights_normalised_inside_box():
    coverage = patch_coverage((2, 0, 6, 4), grid=(2, 2), patch=(4, 4))  # half of patches 0 and 1
    rollout = np.array([0.1, 0.3, 0.4, 0.2])
    weights = rollout_weights(coverage, rollout)
    # 0.5*0.1 : 0.5*0.3 -> 0.25 : 0.75
    assert weights == pytest.approx([0.25, 0.75, 0.0, 0.0])
    assert pooled_embedding(TOKENS, weights) == pytest.approx([0.25, 0.75])


def test_cosine_similarity_self_is_one_and_symmetric():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(5, 16))
    sim = cosine_similarity_matrix(e)
    assert np.diag(sim).tolist() == [1.0] * 5
    assert (sim == sim.T).all()
    assert sim[0, 1] == pytest.approx(e[0] @ e[1] / np.linalg.norm(e[0]) / np.linalg.norm(e[1]))
    assert cosine_similarity_matrix(np.array([[1.0, 0.0], [-2.0, 0.0]]))[0, 1] == -1.0


def test_duplicate_labels_are_numbered():
    assert number_duplicates(["dog", "cat", "dog"]) == ["dog #1", "cat", "dog #2"]
