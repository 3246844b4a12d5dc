"""A map method written the way a user would add one (used by tests/test_methods.py): the query's
attention in the first layer (the CLS token's, or the mean of the patch queries'), mean over heads,
registered under the name ``first``."""

from reportgen.methods.base import ATTENTION_ROWS, ForwardPass, MethodMaps, TokenLayout


class FirstLayer:
    needs = frozenset({ATTENTION_ROWS})

    def __init__(self, spec):
        self.spec = spec

    def reducer(self, depth, layout):
        return None

    def maps(self, forward: ForwardPass, layout: TokenLayout) -> MethodMaps:
        by_layer = layout.to_grid(forward.query_rows.mean(dim=1))  # [L, rows, cols]
        return MethodMaps(
            maps={"first/mean": by_layer[0]},
            layers=by_layer[:, None],
            extras={},
            provenance=f"first-layer attention of {layout.query.name}, mean over heads",
        )


def create(settings):
    from reportgen.methods import METHODS

    return FirstLayer(METHODS["first"])
