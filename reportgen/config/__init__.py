"""The manifest and the settings of a build: read once, validated once, immutable afterwards.

The rules live on declarative models (:mod:`.schema`, with the rules of :mod:`.rules`); the
manifest file, command-line overrides and code building settings all go through them.
"""

from reportgen.config.bounds import (  # noqa: F401
    IMAGE_KINDS,
    MAX_CAPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_INPUT_SIZE,
    MAX_LABEL_LENGTH,
    MAX_MANIFEST_BYTES,
    MAX_NAME_LENGTH,
    MAX_OBJECTS,
    MAX_PATH_LENGTH,
    MAX_RANDOM_ORDERS,
    PERTURBATION_BASELINES,
    MAX_TITLE_LENGTH,
    SCALE_KINDS,
)
from reportgen.config.manifest import ImageEntry, Manifest, ObjectBox, check_overrides, load_manifest  # noqa: F401
from reportgen.config.messages import SettingsError  # noqa: F401
from reportgen.config.options import BuildOptions, ExportOptions, build_options, export_options  # noqa: F401
from reportgen.config.rules import ClassTargets  # noqa: F401
from reportgen.config.schema import (  # noqa: F401
    AttentionSettings, DetectorSettings, EvaluateSettings, ModelSettings, OutputSettings,
)
from reportgen.config.slugs import slugify  # noqa: F401
from reportgen.methods import DEFAULT_METHODS, HEAD_FUSIONS, METHODS  # noqa: F401
