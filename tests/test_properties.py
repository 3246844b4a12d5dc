"""Issue 7: properties of the attention and embedding maths on random inputs (hypothesis).

(``load_manifest`` on arbitrary YAML is property-tested in test_manifest.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reportgen.methods.embeddings import cosine_similarity_matrix
from reportgen.methods.maths import HEAD_FUSIONS, entropy, normalised_entropy, rollout

SETTINGS = settings(max_examples=100, deadline=None)


@st.composite
def attention_stacks(draw):
    """``L`` layers of ``[B, H, N, N]`` positive attention with rows summing to 1."""
    layers = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 3))
    tokens = draw(st.integers(2, 6))
    batch = draw(st.integers(1, 2))
    raw = draw(arrays(np.float64, (layers, batch, heads, tokens, tokens),
                      elements=st.floats(1e-6, 1.0, allow_nan=False, allow_infinity=False)))
    stack = torch.from_numpy(raw / raw.sum(-1, keepdims=True))
    return list(stack)


@SETTINGS
@given(attentions=attention_stacks(), fusion=st.sampled_from(HEAD_FUSIONS), discard=st.floats(0.0, 0.9))
def test_rollout_rows_are_distributions(attentions, fusion, discard):
    joint = rollout(attentions, head_fusion=fusion, discard_ratio=discard)
    n = attentions[0].shape[-1]
    assert joint.shape == (attentions[0].shape[0], n, n)
    assert torch.isfinite(joint).all()
    assert (joint >= 0).all()
    torch.testing.assert_close(joint.sum(-1), torch.ones(joint.shape[:-1], dtype=joint.dtype), atol=1e-9, rtol=0)


@SETTINGS
@given(attentions=attention_stacks(), fusion=st.sampled_from(HEAD_FUSIONS), discard=st.floats(0.0, 0.9))
def test_rollout_rows_are_distributions_in_float32(attentions, fusion, discard):
    # The runner works in the model's float32.
    joint = rollout([a.float() for a in attentions], head_fusion=fusion, discard_ratio=discard)
    assert (joint >= 0).all() and torch.isfinite(joint).all()
    torch.testing.assert_close(joint.sum(-1), torch.ones(joint.shape[:-1]), atol=1e-5, rtol=0)


@st.composite
def distributions(draw, smallest=1e-30):
    """Non-negative ``[R, N]`` weights (rows need not sum to 1; zeros and all-zero rows allowed).

    Positive values are at least ``smallest``; 0 allows subnormal values (below float tiny).
    """
    rows = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    positive = st.floats(smallest, 1e6) if smallest else st.floats(0.0, 1e6, width=32 if dtype == np.float32 else 64)
    values = draw(arrays(np.float64, (rows, n), elements=st.one_of(st.just(0.0), positive)))
    return torch.from_numpy(values.astype(dtype))


def _check_entropy(p):
    n = p.shape[-1]
    # A row with no positive weight is no distribution: its entropy is undefined (NaN).
    defined = (p > 0).any(dim=-1)
    h = entropy(p)
    slack = 1e-5 if p.dtype == torch.float32 else 1e-9
    assert torch.equal(torch.isfinite(h), defined) and torch.isnan(h[~defined]).all()
    h = h[defined]
    assert (h >= -slack).all() and (h <= math.log(n) + slack * max(1.0, math.log(n))).all(), (h, n)
    normalised = normalised_entropy(p)
    assert torch.equal(torch.isfinite(normalised), defined) and torch.isnan(normalised[~defined]).all()
    normalised = normalised[defined]
    assert (normalised >= -slack).all() and (normalised <= 1 + slack).all()


@SETTINGS
@given(p=distributions())
def test_entropy_is_between_zero_and_log_n(p):
    _check_entropy(p)


@SETTINGS
@example(p=torch.tensor([[1e-308]], dtype=torch.float64))
@given(p=distributions(smallest=0))
def test_entropy_of_subnormal_weights_is_between_zero_and_log_n(p):
    _check_entropy(p)


@SETTINGS
@given(n=st.integers(2, 64))
def test_entropy_extremes(n):
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
    one_hot = torch.zeros(n, dtype=torch.float64)
    one_hot[n // 2] = 1.0
    assert entropy(uniform).item() == pytest.approx(math.log(n))
    assert normalised_entropy(uniform).item() == pytest.approx(1.0)
    assert entropy(one_hot).item() == 0.0 and normalised_entropy(one_hot).item() == 0.0


@st.composite
def embeddings(draw, width):
    k = draw(st.integers(1, 6))
    c = draw(st.integers(1, 8))
    dtype = np.float32 if width == 32 else np.float64
    values = draw(arrays(dtype, (k, c), elements=st.floats(allow_nan=False, allow_infinity=False, width=width)))
    # Make zero rows common: an object whose tokens cancel out must not break the table.
    zero_rows = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    values[np.array(zero_rows)] = 0
    return values


def _check_similarity(e):
    sim = cosine_similarity_matrix(e)
    k = e.shape[0]
    assert sim.shape == (k, k)
    assert np.isfinite(sim).all()
    assert (sim >= -1.0).all() and (sim <= 1.0).all()
    assert (sim == sim.T).all()
    nonzero = np.any(e != 0, axis=1)
    assert (np.diag(sim)[nonzero] == 1.0).all(), (e, sim)


@SETTINGS
@given(e=embeddings(32))
def test_cosine_similarity_of_float32_embeddings(e):
    # Model embeddings are float32: their whole finite range, including subnormals.
    _check_similarity(e)


@SETTINGS
@example(e=np.array([[3.8e-282]]))
@given(e=embeddings(64))
def test_cosine_similarity_of_extreme_float64_embeddings(e):
    _check_similarity(e)


@SETTINGS
@given(e=embeddings(32), scale=st.floats(1e-3, 1e3))
def test_cosine_similarity_ignores_scale(e, scale):
    # Realistic magnitudes: scaling a row never changes its similarities.
    e = np.clip(e, -1e3, 1e3)
    e[np.abs(e) < 1e-3] = 0
    scaled = e.copy()
    scaled[0] *= scale
    np.testing.assert_allclose(cosine_similarity_matrix(scaled), cosine_similarity_matrix(e), atol=1e-9)
