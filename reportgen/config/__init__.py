"""The manifest and the settings of a build: read once, validated once, immutable afterwards."""

from reportgen.config.manifest import (  # noqa: F401
    IMAGE_KINDS,
    MAX_CAPTION_LENGTH,
    MAX_ID_LENGTH,
    MAX_INPUT_SIZE,
    MAX_LABEL_LENGTH,
    MAX_MANIFEST_BYTES,
    MAX_NAME_LENGTH,
    MAX_OBJECTS,
    MAX_PATH_LENGTH,
    MAX_TITLE_LENGTH,
    AttentionSettings,
    DetectorSettings,
    ImageEntry,
    Manifest,
    ModelSettings,
    ObjectBox,
    OutputSettings,
    SettingsError,
    load_manifest,
    number_problem,
    slugify,
    text_problem,
)
from reportgen.methods import HEAD_FUSIONS  # noqa: F401
