"""The maths of the maps: pure functions on arrays, and the map methods built from them.

Importing this package imports no torch: the settings check method names against it.
"""

#: How rollout fuses the heads of a layer (the settings accept exactly these).
HEAD_FUSIONS = ("mean", "max", "min")

#: The map methods by the name the manifest, the command line and the API use, each with the
#: module that implements it (imported only when a build runs the model: methods need torch).
#: Adding a method is a module, one line here, and its tests.
METHODS = {
    "attention": "reportgen.methods.attention",
    "rollout": "reportgen.methods.rollout",
}

#: What a build runs when the manifest and the command line name no methods.
DEFAULT_METHODS = ("attention", "rollout")
