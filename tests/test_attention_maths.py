"""Rollout, entropy and agreement measures against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from reportgen.methods.maths import (
    discard_lowest,
    entropy,
    normalised_entropy,
    rank,
    rollout,
    rollout_step,
    spearman,
    top_fraction_overlap,
)

# Two layers, three tokens, worked by hand from Abnar & Zuidema (2020):
# R_l = 0.5 * A_l + 0.5 * I (rows already sum to 1 here), rollout = R_2 @ R_1.
A1 = [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]
A2 = [[0.2, 0.4, 0.4], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]
# R1 = [[.75,.15,.1],[.05,.9,.05],[.1,.1,.8]], R2 = [[.6,.2,.2],[.15,.65,.2],[0,.25,.75]]
EXPECTED = [[0.48, 0.29, 0.23], [0.165, 0.6275, 0.2075], [0.0875, 0.3, 0.6125]]


def _heads(*maps):
    """[1, H, N, N] from per-head maps."""
    return torch.tensor([maps], dtype=torch.float64)


def test_rollout_two_layers_three_tokens_by_hand():
    result = rollout([_heads(A1), _heads(A2)])
    torch.testing.assert_close(result[0], torch.tensor(EXPECTED, dtype=torch.float64))
    torch.testing.assert_close(result.sum(-1), torch.ones(1, 3, dtype=torch.float64))


def test_rollout_mean_fusion_over_heads():
    # Two heads whose mean is A1 (resp. A2) give the same rollout as one head.
    a1 = torch.tensor(A1, dtype=torch.float64)
    a2 = torch.tensor(A2, dtype=torch.float64)
    h1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    layer1 = torch.stack([h1, 2 * a1 - h1])[None]  # mean of the two heads is A1
    layer2 = torch.stack([a2, a2])[None]
    result = rollout([layer1, layer2], head_fusion="mean")
    torch.testing.assert_close(result[0], torch.tensor(EXPECTED, dtype=torch.float64))


def test_rollout_max_fusion_renormalises_rows():
    # Max over heads of two one-hot rows is not a distribution; rollout must still be row-stochastic.
    h1 = torch.eye(3, dtype=torch.float64)
    h2 = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    step = rollout_step(None, torch.stack([h1, h2])[None], head_fusion="max")
    # max = I + P; 0.5*(I+P) + 0.5*I = I + 0.5P; rows sum to 1.5 -> divide: diag 2/3, P entries 1/3.
    expected = (torch.eye(3, dtype=torch.float64) * 2 + h2) / 3
    torch.testing.assert_close(step[0], expected)


def test_discard_lowest_keeps_cls_to_cls():
    fused = torch.tensor([[[0.01, 0.5, 0.49], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1]]])
    out = discard_lowest(fused, 0.34)  # int(9 * 0.34) = 3 lowest: 0.01 (kept, CLS-CLS), 0.1, 0.2
    assert out[0, 0, 0] == pytest.approx(0.01)
    assert out[0, 2, 2] == 0 and out[0, 2, 0] == 0
    assert (out > 0).sum() == 7


def test_entropy_uniform_is_log_n_and_one_hot_is_zero():
    for n in (2, 7, 196):
        uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
        assert entropy(uniform).item() == pytest.approx(math.log(n))
        assert normalised_entropy(uniform).item() == pytest.approx(1.0)
    one_hot = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert entropy(one_hot).item() == 0.0
    # Unnormalised input (a CLS row restricted to patches) is treated as a distribution.
    assert entropy(torch.tensor([0.2, 0.2])).item() == pytest.approx(math.log(2))
    # By hand: p = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2.
    assert entropy(torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)).item() == pytest.approx(1.5 * math.log(2))


def test_spearman_and_top_overlap_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # Ties: b ranks = (1.5, 1.5, 3, 4, 5); rho computed by hand = 0.9746794...
    b = np.array([1.0, 1.0, 2.0, 3.0, 4.0])
    ra = a - 3
    rb = np.array([1.5, 1.5, 3, 4, 5]) - 3
    assert spearman(a, b) == pytest.approx((ra @ rb) / math.sqrt((ra @ ra) * (rb @ rb)))
    x = np.arange(20.0)
    y = x.copy()
    y[19], y[0] = y[0], y[19]  # the top entry moves to the bottom
    assert top_fraction_overlap(x, x, 0.1) == 1.0
    assert top_fraction_overlap(x, y, 0.1) == 0.5  # k = 2: {19, 18} vs {0, 18}


def test_rollout_start_layer_two_keeps_only_the_last_layer_of_two():
    # Layer 1 counts as the identity, so the rollout is R2 alone (worked out above).
    r2 = [[0.6, 0.2, 0.2], [0.15, 0.65, 0.2], [0.0, 0.25, 0.75]]
    result = rollout([_heads(A1), _heads(A2)], start_layer=2)
    torch.testing.assert_close(result[0], torch.tensor(r2, dtype=torch.float64))
    torch.testing.assert_close(rollout([_heads(A1), _heads(A2)], start_layer=1)[0], torch.tensor(EXPECTED, dtype=torch.float64))


@pytest.mark.parametrize("start", [1, 2, 3, 4])
def test_rollout_start_layer_is_the_product_of_layers_start_to_last(start):
    rng = np.random.default_rng(start)
    layers = []
    for _ in range(4):  # 4 layers, 2 heads, 5 tokens, rows of each head sum to 1
        a = rng.random((1, 2, 5, 5))
        layers.append(a / a.sum(axis=-1, keepdims=True))
    expected = np.eye(5)
    for a in layers[start - 1 :]:
        step = 0.5 * a[0].mean(axis=0) + 0.5 * np.eye(5)
        expected = (step / step.sum(axis=1, keepdims=True)) @ expected
    result = rollout([torch.from_numpy(a) for a in layers], start_layer=start)
    np.testing.assert_allclose(result[0].numpy(), expected, atol=1e-12)


def test_ranks_of_tied_values_are_their_average_rank_as_scipy_gives():
    from scipy.stats import rankdata

    rng = np.random.default_rng(3)
    for size in (0, 1, 2, 7, 196):
        for levels in (1, 3, 50):
            values = rng.integers(0, levels, size).astype(np.float64)
            np.testing.assert_array_equal(rank(values), rankdata(values, method="average"))


def test_the_entropies_of_a_stack_are_each_row_s_own():
    from reportgen.experiments import Entropy

    rng = np.random.default_rng(4)
    rows = rng.random((5, 196)) ** 8
    rows[2] = 0.0  # no mass: undefined
    rows[3, 1:] = 0.0  # one patch: 0
    stacked = Entropy.of_rows(rows)
    assert stacked[2] == Entropy(None, None) and stacked[3] == Entropy(0.0, 0.0)
    for index in (0, 1, 4):
        p = rows[index] / rows[index].sum()
        nats = -sum(v * math.log(v) for v in p if v > 0)
        assert stacked[index].nats == pytest.approx(nats, rel=1e-12)
        assert stacked[index].normalised == pytest.approx(nats / math.log(196), rel=1e-12)
    one = Entropy.of(rows[0].reshape(14, 14))  # a single map: the same entropy (sums may run in another order)
    assert (one.nats, one.normalised) == pytest.approx((stacked[0].nats, stacked[0].normalised), rel=1e-12)
