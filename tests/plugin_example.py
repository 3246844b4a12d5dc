"""A map method written the way a user would add one (used by tests/test_methods.py): the CLS
token's attention in the first layer, mean over heads, registered under the name ``first``."""

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
            provenance="first-layer attention of the CLS token, mean over heads",
        )


def create(settings):
    from reportgen.methods import METHODS

    return FirstLayer(METHODS["first"])
