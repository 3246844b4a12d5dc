"""The evaluation of the maps: curve areas, removal orders, the perturbation (never on padding),
a constructed model whose output depends on one patch, the random baseline's reproducibility,
the pointing game and mass in a box in model-input pixels, and the evaluate settings."""

import numpy as np
import pytest
import torch

from reportgen.methods.evaluation import (
    curve_auc,
    map_peak,
    mass_in_box,
    pointing_hit,
    random_orders,
    removal_masks,
    removal_order,
    step_counts,
)
from reportgen.model.adapters import ModelAdapter
from reportgen.model.loading import LoadedModel
from reportgen.model.perturbation import MapTarget, Perturber, Subject, forward_count

GRID = (4, 6)
PATCH = (8, 8)
SIZE = (32, 48)  # H, W


# -- pure maths ---------------------------------------------------------------------------


def test_area_of_hand_made_curves():
    assert curve_auc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    # Trapezoids of width 0.25 and 0.75: (1 + 1) / 2 * 0.25 + (1 + 0) / 2 * 0.75.
    assert curve_auc([0.0, 0.25, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.625)
    assert curve_auc(np.linspace(0, 1, 11), np.ones(11)) == pytest.approx(1.0)


def test_step_counts_round_to_the_nearest_patch():
    assert step_counts(7).tolist() == [0, 1, 1, 2, 3, 4, 4, 5, 6, 6, 7]  # 3.5 rounds up
    assert step_counts(20).tolist() == list(range(0, 21, 2))


def test_removal_order_follows_the_map_and_breaks_ties_by_patch_index():
    grid = np.array([[0.1, 0.5, 0.5], [0.9, 0.1, 0.5], [0.7, 0.0, 0.2]])
    content = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.0]])  # (2,0) and (2,2) padding
    # Most relevant first: 0.9 (3), then the three 0.5s in index order (1, 2, 5), 0.1s (0, 4), 0.0 (7).
    assert removal_order(grid, content).tolist() == [3, 1, 2, 5, 0, 4, 7]
    # Least relevant first: ties again in index order, padding never listed.
    assert removal_order(grid, content, most_relevant_first=False).tolist() == [7, 0, 4, 1, 2, 5, 3]
    masks = removal_masks(np.array([3, 1, 2]), np.array([0, 1, 3]), 9)
    assert masks[0].sum() == 0 and np.flatnonzero(masks[1]).tolist() == [3] and np.flatnonzero(masks[2]).tolist() == [1, 2, 3]


def test_random_orders_are_reproducible_permutations_of_the_content_patches():
    candidates = np.array([0, 2, 3, 7, 8])
    a, b = random_orders(candidates, 4, seed=0), random_orders(candidates, 4, seed=0)
    assert np.array_equal(a, b)
    assert all(sorted(row) == candidates.tolist() for row in a)
    assert not np.array_equal(a, random_orders(candidates, 4, seed=1))
    state = np.random.get_state()[1].copy()
    random_orders(candidates, 4)
    assert np.array_equal(state, np.random.get_state()[1])  # the global generator untouched


def test_pointing_game_in_input_pixels_with_the_15_pixel_tolerance():
    grid = np.zeros((4, 6))
    grid[0, 1] = 1.0  # centre (12, 4) in input pixels with 8 px patches
    content = np.ones((4, 6))
    assert map_peak(grid, content, (8, 8)) == (12.0, 4.0)
    assert pointing_hit(grid, content, (8, 8), (26.0, 0.0, 40.0, 10.0))  # 14 px to its left edge
    assert not pointing_hit(grid, content, (8, 8), (28.0, 0.0, 40.0, 10.0))  # 16 px
    assert pointing_hit(grid, content, (8, 8), (28.0, 0.0, 40.0, 10.0), tolerance=16.0)
    # A flat map points nowhere.
    assert map_peak(np.zeros((4, 6)), content, (8, 8)) is None
    assert pointing_hit(np.full((4, 6), 0.5), content, (8, 8), (0.0, 0.0, 48.0, 32.0)) is None
    # The peak is taken over the image: a larger value on padding does not count.
    grid[3, 5] = 5.0
    content[3, 5] = 0.0
    assert map_peak(grid, content, (8, 8)) == (12.0, 4.0)


def test_mass_in_box_is_a_share_of_the_mass_on_the_image():
    grid = np.array([[1.0, 3.0], [2.0, 4.0]])
    content = np.array([[1.0, 1.0], [1.0, 0.0]])  # (1, 1) is padding
    coverage = np.array([[0.0, 1.0], [0.5, 0.0]])
    assert mass_in_box(grid, content, coverage) == pytest.approx((3.0 + 1.0) / (1.0 + 3.0 + 2.0))
    assert mass_in_box(np.zeros((2, 2)), content, coverage) is None


# -- the perturbation, with constructed models ----------------------------------------------


class OnePatchModel(torch.nn.Module):
    """A headless "ViT" whose embedding is the pixels of one patch (so its label-free score
    depends on exactly that patch), or with ``classes`` a classifier whose logits are a fixed
    linear function of that patch's pixels."""

    def __init__(self, row: int, col: int, classes: int = 0):
        super().__init__()
        self.row, self.col = row, col
        self.num_classes = classes
        generator = torch.Generator().manual_seed(3)
        self.weight = torch.randn(classes, 3 * PATCH[0] * PATCH[1], generator=generator) if classes else None

    def forward_features(self, x):
        """One token per patch, row by row: its pixels."""
        rows, cols = GRID
        patches = x.reshape(len(x), 3, rows, PATCH[0], cols, PATCH[1]).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(len(x), rows * cols, -1)

    def forward_head(self, features, pre_logits=False):
        pooled = features[:, self.row * GRID[1] + self.col]
        return pooled if pre_logits else pooled @ self.weight.T


class OnePatchAdapter(ModelAdapter):
    """The constructed model behind the model interface: the evaluation reads only its forward
    pass and head; it has no attention to capture."""

    library = "test"

    def __init__(self, model):
        self.module = model

    layer_names = ()
    heads = None
    num_prefix_tokens = 0
    prefix_kinds = ()
    class_token = False
    grid = GRID
    patch_size = PATCH
    input_size = SIZE

    def _no_attention(self, *args):
        raise AssertionError("the one-patch model has no attention")

    attention_capture = token_norms = attention_gradients = block_gradients = _no_attention

    def forward_features(self, x):
        return self.module.forward_features(x)

    def forward_head(self, features, pre_logits=False):
        return self.module.forward_head(features, pre_logits=pre_logits)

    @property
    def num_classes(self):
        return self.module.num_classes

    def class_names(self):
        return None


def loaded(model, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)) -> LoadedModel:
    return LoadedModel(
        model=model, name="one patch", architecture="test", source="constructed", weights_file=None, weights_sha256=None,
        data_config={"input_size": (3, *SIZE), "mean": mean, "std": std}, num_prefix_tokens=0, grid=GRID,
        patch_size=PATCH, device=torch.device("cpu"), adapter=OnePatchAdapter(model),
    )


def image(seed=0) -> torch.Tensor:
    return torch.rand(3, *SIZE, generator=torch.Generator().manual_seed(seed)) + 0.5  # all positive


def marking(row, col, noise_seed=5):
    grid = np.random.default_rng(noise_seed).uniform(0.0, 0.1, GRID)
    grid[row, col] = 1.0
    return grid


def test_the_map_that_marks_the_patch_drops_the_score_at_the_first_step_and_beats_random():
    model = OnePatchModel(1, 2)
    x = image()
    content = np.ones(GRID)
    maps = {"right": marking(1, 2), "wrong": marking(3, 5)}
    perturber = Perturber(loaded(model), baseline="zero", random_orders=8)
    (curves,) = perturber.curves([Subject(x, maps, content, (0.0, 0.0, 48.0, 32.0))])
    # 24 content patches: 2 per step; black (0 after normalisation) zeroes the embedding.
    assert curves.fractions.tolist() == pytest.approx((step_counts(24) / 24).tolist())
    right = curves.maps["right"]
    assert right["deletion"].tolist() == pytest.approx([1.0] + [0.0] * 10)
    assert right["negative"][:-1].tolist() == pytest.approx([1.0] * 10) and right["negative"][-1] == pytest.approx(0.0)
    assert right["insertion"][1:].tolist() == pytest.approx([1.0] * 10)
    random_deletion = np.array([curve_auc(curves.fractions, c) for c in curves.random["deletion"]])
    assert curves.auc("right", "deletion") == pytest.approx(0.5 * 2 / 24)
    assert curves.auc("right", "deletion") < random_deletion.mean()
    assert curves.auc("right", "negative") > random_deletion.mean()
    assert curves.auc("wrong", "deletion") > curves.auc("right", "deletion")
    # Each random curve drops to 0 exactly at the step that removes the patch.
    for curve in curves.random["deletion"]:
        assert set(np.round(curve, 12)) <= {0.0, 1.0} and np.all(np.diff(curve) <= 0)
    assert curves.forwards == forward_count(2, 8)


def test_scores_equal_a_hand_computation_of_the_perturbed_inputs():
    """A classifier with a letterboxed input: each score is the softmax probability of the top-1
    class on an input made here from the removal order, over the unperturbed one."""
    model = OnePatchModel(0, 1, classes=4)
    x = image(1)
    content = np.ones(GRID)
    content[3] = 0.0  # the last patch row is padding: the content box ends at y = 24
    box = (0.0, 0.0, 48.0, 24.0)
    grid = np.random.default_rng(2).uniform(size=GRID)
    perturber = Perturber(loaded(model, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)), baseline="mean", random_orders=0)
    (curves,) = perturber.curves([Subject(x, {"m": grid}, content, box)])

    def probability(t):
        logits = model.forward_head(model.forward_features(t[None]))[0].double()
        return torch.softmax(logits, dim=0)

    top = int(probability(x).argmax())
    colour = x[:, :24].mean(dim=(1, 2))
    order = [int(i) for i in np.argsort(-grid[:3].ravel(), kind="stable")]  # the 18 content patches
    expected = [1.0]
    for count in step_counts(18)[1:]:
        t = x.clone()
        for flat in order[:count]:
            r, c = divmod(flat, GRID[1])
            t[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = colour[:, None, None]
        expected.append(float(probability(t)[top] / probability(x)[top]))
    assert curves.maps["m"]["deletion"] == pytest.approx(np.array(expected), rel=1e-5)
    assert "class" in curves.target


def test_the_perturbation_never_touches_padding():
    model = OnePatchModel(0, 0)
    x = image(2)
    content = np.ones(GRID)
    content[:, 5] = 0.0  # the last patch column is padding ...
    content[:, 4] = 0.5  # ... and half of the one before it
    box = (0.0, 0.0, 36.0, 32.0)
    maps = {"m": np.random.default_rng(0).uniform(size=GRID)}
    maps["m"][:, 5] = 10.0  # a peak on padding is never removed first: it is never removed at all
    for baseline in ("mean", "blur", "zero"):
        perturber = Perturber(loaded(model), baseline=baseline, random_orders=2, chunk=7)
        subject = Subject(x, maps, content, box)
        inputs = torch.cat(list(perturber.inputs([subject])))
        assert len(inputs) == forward_count(1, 2) - 1  # every input but the unperturbed one
        assert torch.equal(inputs[..., 36:], x[..., 36:].expand_as(inputs[..., 36:]))
        assert not torch.equal(inputs[0][..., :36], x[..., :36])  # the first input: all content removed
    # The first deletion step removes the two content patches with the largest values.
    perturber = Perturber(loaded(model), baseline="zero", random_orders=0)
    first = list(perturber.inputs([Subject(x, maps, content, box)]))[0][2]
    values = np.where(content > 0, maps["m"], -np.inf).ravel()
    removed = sorted(np.argsort(-values, kind="stable")[:2].tolist())
    for flat in range(24):
        r, c = divmod(flat, 6)
        cell, original = first[:, r * 8 : (r + 1) * 8, c * 8 : min((c + 1) * 8, 36)], x[:, r * 8 : (r + 1) * 8, c * 8 : min((c + 1) * 8, 36)]
        if flat in removed:
            assert torch.all(cell == 0)
        elif cell.numel():
            assert torch.equal(cell, original)


def test_the_random_baseline_is_reproducible():
    model = OnePatchModel(2, 3)
    subject = Subject(image(3), {"m": marking(2, 3)}, np.ones(GRID), (0.0, 0.0, 48.0, 32.0))
    first = Perturber(loaded(model), random_orders=3).curves([subject])[0]
    again = Perturber(loaded(model), random_orders=3).curves([subject])[0]
    other = Perturber(loaded(model), random_orders=3, seed=7).curves([subject])[0]
    for kind in ("deletion", "insertion"):
        assert np.array_equal(first.random[kind], again.random[kind])
    assert not np.array_equal(first.random["deletion"], other.random["deletion"])


def test_a_batch_gives_the_same_curves_as_each_image_alone():
    model = OnePatchModel(1, 1, classes=3)
    subjects = [Subject(image(s), {"m": marking(s % 4, s)}, np.ones(GRID), (0.0, 0.0, 48.0, 32.0)) for s in range(3)]
    together = Perturber(loaded(model), random_orders=2, chunk=5).curves(subjects)
    for subject, curves in zip(subjects, together):
        (alone,) = Perturber(loaded(model), random_orders=2).curves([subject])
        for kind in ("deletion", "negative", "insertion"):
            assert curves.maps["m"][kind] == pytest.approx(alone.maps["m"][kind], rel=1e-6)
        assert curves.random["insertion"] == pytest.approx(alone.random["insertion"], rel=1e-6)


def _deleted(x, grid, count, colour):
    """``x`` with the ``count`` patches of largest ``grid`` value (ties by index) filled with ``colour``."""
    t = x.clone()
    for flat in [int(i) for i in np.argsort(-grid.ravel(), kind="stable")][:count]:
        r, c = divmod(flat, GRID[1])
        t[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = colour[:, None, None]
    return t


def test_a_further_class_s_map_is_scored_with_that_class_not_the_top_1():
    """A ``target-k`` map's curves are the probability of its own class k, worked out here on
    inputs made from the removal order; the image's other maps keep the top-1 class; each target
    has its own random orders."""
    model = OnePatchModel(1, 2, classes=5)
    x = image(4)
    grid = np.random.default_rng(6).uniform(size=GRID)

    def probability(t):
        return torch.softmax(model.forward_head(model.forward_features(t[None]))[0].double(), dim=0)

    ranked = torch.argsort(probability(x), descending=True).tolist()
    top, k = ranked[0], ranked[3]  # an unlikely class: its probability moves unlike the top-1's
    maps = {"m": grid, "m/target-2": grid}
    subject = Subject(x, maps, np.ones(GRID), (0.0, 0.0, 48.0, 32.0), targets={"m/target-2": MapTarget("class", class_index=k)})
    (curves,) = Perturber(loaded(model), baseline="mean", random_orders=2).curves([subject])
    colour = x.mean(dim=(1, 2))
    for name, cls in (("m", top), ("m/target-2", k)):
        expected = [float(probability(_deleted(x, grid, n, colour))[cls] / probability(x)[cls]) for n in step_counts(24)]
        expected[0] = 1.0
        assert curves.maps[name]["deletion"] == pytest.approx(np.array(expected), rel=1e-5)
        target = curves.targets[curves.scored_with[name]]
        assert target.kind == "class" and target.class_index == cls
        assert target.reference == pytest.approx(float(probability(x)[cls]), rel=1e-5)
    assert curves.scored_with == {"m": 0, "m/target-2": 1}
    assert not np.allclose(curves.maps["m"]["deletion"], curves.maps["m/target-2"]["deletion"])
    assert not np.allclose(curves.targets[0].random["deletion"], curves.targets[1].random["deletion"])
    # The random orders of class k are its probability on the same inputs: the end points agree.
    assert curves.targets[1].random["deletion"][:, -1] == pytest.approx(curves.maps["m/target-2"]["deletion"][-1])
    assert curves.forwards == forward_count(2, 2)  # further targets cost no forward pass


def test_an_object_s_map_is_scored_with_the_cosine_to_the_object_s_embedding():
    """An ``object-j`` map's curves: the cosine of the pooled embedding with the object's
    embedding (the unperturbed input's patch tokens averaged with the box's coverage), over its
    value on the unperturbed input, worked out here; in a headless model the other maps keep the
    label-free score."""
    model = OnePatchModel(2, 1)
    x = image(5)
    coverage = np.zeros(GRID)
    coverage[1:3, 0:2] = 1.0
    coverage[1:3, 2] = 0.5
    grid = np.random.default_rng(8).uniform(size=GRID)
    subject = Subject(x, {"m": grid, "m/object-1": grid}, np.ones(GRID), (0.0, 0.0, 48.0, 32.0),
                      targets={"m/object-1": MapTarget("object", object_label="cup", coverage=coverage)})
    (curves,) = Perturber(loaded(model), baseline="mean", random_orders=1).curves([subject])
    tokens = model.forward_features(x[None])[0].double()
    weights = torch.tensor(coverage.ravel() / coverage.sum())
    obj = weights @ tokens

    def cosine(t):
        e = model.forward_head(model.forward_features(t[None]), pre_logits=True)[0].double()
        return float(e @ obj / (e.norm() * obj.norm()))

    def label_free(t):
        e = model.forward_head(model.forward_features(t[None]), pre_logits=True)[0].double()
        e0 = model.forward_head(model.forward_features(x[None]), pre_logits=True)[0].double()
        return float(e @ e0 / (e0 @ e0))

    colour = x.mean(dim=(1, 2))
    for name, score in (("m/object-1", cosine), ("m", label_free)):
        expected = [score(_deleted(x, grid, n, colour)) / score(x) for n in step_counts(24)]
        assert curves.maps[name]["deletion"] == pytest.approx(np.array(expected), rel=1e-5)
    assert not np.allclose(curves.maps["m"]["deletion"], curves.maps["m/object-1"]["deletion"])
    target = curves.targets[curves.scored_with["m/object-1"]]
    assert (target.kind, target.object_label, target.label) == ("object", "cup", "object 'cup'")
    assert target.reference == pytest.approx(cosine(x), rel=1e-5)
    assert curves.targets[0].kind == "label-free" and curves.scored_with["m"] == 0


def test_an_object_at_or_below_zero_cosine_is_not_scored():
    """Dividing by a cosine at or below zero on the unperturbed input would turn the curve upside
    down: such an object map gets no curve (NaN) and beats nothing, while the other maps are scored."""
    model = OnePatchModel(2, 1)
    x = image(5)
    # The top-left patch holds the negative of the embedding's patch: its token points away.
    x[:, : PATCH[0], : PATCH[1]] = -x[:, 2 * PATCH[0] : 3 * PATCH[0], PATCH[1] : 2 * PATCH[1]]
    tokens = model.forward_features(x[None])[0].double()
    e = model.forward_head(model.forward_features(x[None]), pre_logits=True)[0].double()
    cosine = float(tokens[0] @ e / (tokens[0].norm() * e.norm()))
    assert cosine == pytest.approx(-1.0)
    coverage = np.zeros(GRID)
    coverage[0, 0] = 1.0
    grid = np.random.default_rng(8).uniform(size=GRID)
    subject = Subject(x, {"m": grid, "m/object-1": grid}, np.ones(GRID), (0.0, 0.0, 48.0, 32.0),
                      targets={"m/object-1": MapTarget("object", object_label="shadow", coverage=coverage)})
    (curves,) = Perturber(loaded(model), baseline="mean", random_orders=1).curves([subject])
    target = curves.targets[curves.scored_with["m/object-1"]]
    assert target.reference == pytest.approx(cosine, rel=1e-5)
    for kind in ("deletion", "negative", "insertion"):
        assert np.isnan(curves.maps["m/object-1"][kind]).all() and np.isfinite(curves.maps["m"][kind]).all()
        assert np.isnan(curves.auc("m/object-1", kind))
