"""Bounds: every size a manifest (or the command line) can set.

A value over a bound is a located manifest error (or a usage error for an option), never a slow
build, a huge figure or a crash.
"""

#: The kinds of image: "single" (one main object) or "multi" (several objects).
IMAGE_KINDS = ("single", "multi")

#: The colour scales of the maps (output.scale): each map to its own maximum, one maximum shared
#: by a figure family of one image, or each map to its own percentile (output.scale_percentile).
SCALE_KINDS = ("map", "shared", "percentile")

#: Largest manifest file read: a manifest of thousands of images is well under 1 MiB; anything
#: bigger is not a manifest (and /dev/zero would otherwise be read until memory runs out).
MAX_MANIFEST_BYTES = 10 * 1024 * 1024

#: Longest image id. An id is also the default title and is shown on every card; 200 characters
#: is a long sentence (a file-name stem used as the id is bounded by it too).
MAX_ID_LENGTH = 200

#: Longest object label: labels head the rows and columns of the similarity tables.
MAX_LABEL_LENGTH = 200

#: Longest report or image title.
MAX_TITLE_LENGTH = 500

#: Longest image caption (a paragraph).
MAX_CAPTION_LENGTH = 2000

#: Longest name of a model, detector, colour map or map method, and longest text value of a
#: model option.
MAX_NAME_LENGTH = 200

#: Longest path written in the manifest (Linux's PATH_MAX).
MAX_PATH_LENGTH = 4096

#: Most objects (boxes) on one image: the similarity tables grow with its square.
MAX_OBJECTS = 64

#: Largest model.input_size accepted; anything bigger is a typo that would only fail later
#: with an out-of-memory error deep inside the model.
MAX_INPUT_SIZE = 4096

#: What replaces a patch the evaluation removes (evaluate.baseline): the image's mean colour,
#: the image blurred, or black.
PERTURBATION_BASELINES = ("mean", "blur", "zero")

#: Most seeded random orders the evaluation's random baseline averages over (evaluate.random_orders):
#: each costs about 2 x 9 forward passes per image.
MAX_RANDOM_ORDERS = 100
