"""The maths of the maps: pure functions on arrays, and the map methods built from them.

Importing this package imports no torch: the settings check method names against it.
"""

#: How rollout fuses the heads of a layer (the settings accept exactly these).
HEAD_FUSIONS = ("mean", "max", "min")
