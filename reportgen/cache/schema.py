"""The schema a cached record and model description must fit (see :mod:`reportgen.cache.status`).

Strict types: "1" is not a number and true is not a count; JSON's NaN and Infinity are refused
(results.json and the records write them as null), and so are strings with lone surrogates,
which could not be written to a page.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from reportgen.config import MAX_OBJECTS
from reportgen.methods import QUERIES

# Bounds of what a cached record may hold.
MAX_TEXT = 500  # labels, reasons, names and other strings (characters; the manifest's labels are shorter)
MAX_COUNT = 1 << 20  # sizes, grid sides, layers, heads, token counts
MAX_LIST = 256  # layers captured, version entries, data-config lists

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Number = Finite | None
Share = Annotated[float, Field(ge=0.0, le=1.0)] | None  # scores, visible shares, overlaps
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Pair = Annotated[list[Count], Field(min_length=2, max_length=2)]
Box = Annotated[list[Finite], Field(min_length=4, max_length=4)]
Matrix = list[list[Number]]  # shapes are checked against the model in _check_record


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _DataConfig(_Schema):
    input_size: Annotated[list[Count], Field(max_length=4)]
    interpolation: Text | None
    mean: Annotated[list[Number], Field(max_length=4)] | Number
    std: Annotated[list[Number], Field(max_length=4)] | Number
    crop_pct: Number
    crop_mode: Text | None


class _ModelInfo(_Schema):
    name: Text
    architecture: Text
    source: Text
    weights_file: Text | None
    weights_sha256: Text | None
    input_size: Pair
    patch_size: Pair
    grid: Pair
    num_prefix_tokens: Count
    query: Literal[tuple(QUERIES)]  # type: ignore[valid-type]  # the keys of the queries there are
    depth: Count
    heads: Count | None
    data_config: _DataConfig


class _Capture(_Schema):
    method: Text
    layers: Annotated[list[Text], Field(max_length=MAX_LIST)]
    fused_attention: Count


class ModelRun(_Schema):
    """``model_run``: what :func:`reportgen.site.records.model_run_record` writes."""

    model: _ModelInfo
    capture: _Capture
    versions: Annotated[dict[Text, Text | None], Field(max_length=MAX_LIST)]


class _Entropy(_Schema):
    nats: Number
    normalised: Number  # None, with nats, for an all-zero map (it has no entropy)

    @model_validator(mode="after")
    def _both_or_neither(self):
        if (self.nats is None) != (self.normalised is None):
            raise ValueError("nats and normalised must both be numbers or both be null")
        return self


class _BoxMass(_Schema):
    label: Text
    mass: Number
    area_share: Number


class _Attention(_Schema):
    head_entropy: list[_Entropy]
    mean_entropy: _Entropy
    max_entropy: _Entropy
    token_entropy: _Entropy
    token_count: Count
    prefix_mass: Number
    box_mass: Annotated[list[_BoxMass], Field(max_length=MAX_OBJECTS)]
    cls_mean: Matrix
    cls_max: Matrix
    cls_heads: list[Matrix]


class _Rollout(_Schema):
    raw_entropy: _Entropy
    rollout_entropy: _Entropy
    entropy_change: Number  # null exactly when either entropy is
    spearman: Number
    top_overlap: Share
    provenance: Text
    raw: Matrix
    rollout: Matrix

    @model_validator(mode="after")
    def _change_defined_with_entropies(self):
        defined = self.raw_entropy.normalised is not None and self.rollout_entropy.normalised is not None
        if defined != (self.entropy_change is not None):
            raise ValueError("entropy_change must be null exactly when an entropy is")
        return self


class _Target(_Schema):
    kind: Literal["class", "label-free", "object"]
    description: Text
    score: Finite
    class_index: Count | None
    class_name: Text | None
    object_label: Text | None
    reason: Text | None


class _Map(_Schema):
    method: Text
    provenance: Text
    entropy: _Entropy
    grid: Matrix
    figure: Text
    target: _Target | None = None  # exactly for the methods that explain a target (checked in _check_record)


class _Prediction(_Schema):
    index: Count
    name: Text | None
    probability: Share


class _Content(_Schema):
    fraction: Share
    weights: Matrix
    padding_share: Annotated[dict[Text, Share], Field(max_length=MAX_LIST)]


class _Concentration(_Schema):
    peak: Pair
    peak_share: Share
    peak_is_outlier: bool
    outlier_share: Share
    prefix_share: Annotated[dict[Text, Share], Field(max_length=8)]
    note: bool


class _LayerPeak(_Schema):
    layer: Count
    share: Share


class _Norms(_Schema):
    patches: list[Matrix]
    prefix: list[list[Number]]
    threshold: list[Number]
    outliers: list[list[Pair]]


class _Scale(_Schema):
    kind: Literal["map", "shared", "percentile"]
    top: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None
    above: Count | None


class _Scales(_Schema):
    maps: Annotated[dict[Text, _Scale], Field(max_length=MAX_LIST)]
    tokens: _Scale | None  # None without the attention method
    explorer: Annotated[dict[Text, _Scale], Field(max_length=MAX_LIST)]


class _Object(_Schema):
    label: Text
    base_label: Text
    box: Box
    input_box: Box
    visible: Share
    score: Share


class _Skipped(_Schema):
    label: Text
    reason: Text


class _Objects(_Schema):
    source: Text
    labels: Annotated[list[Text], Field(max_length=MAX_OBJECTS)]
    objects: Annotated[list[_Object], Field(max_length=MAX_OBJECTS)]
    skipped: Annotated[list[_Skipped], Field(max_length=MAX_OBJECTS)]
    mean_plain_similarity: Number
    mean_rollout_similarity: Number
    plain_similarity: Matrix
    rollout_similarity: Matrix | None  # None without the rollout method
    difference: Matrix | None
    detector_unavailable: None  # an image whose detector could not be loaded is never cached


Curve = Annotated[list[Number], Field(max_length=MAX_LIST)]
_KindMap = Annotated[dict[Text, Curve], Field(max_length=8)]


class _RandomBaseline(_Schema):
    mean: Curve
    std: Curve
    aucs: Annotated[list[Number], Field(max_length=1000)]
    auc_mean: Number
    auc_std: Number


class _ScoredTarget(_Schema):
    kind: Literal["class", "label-free", "object"]
    description: Text
    label: Text
    class_index: Annotated[int, Field(ge=0)] | None
    object_label: Text | None
    reference_score: Number
    random: Annotated[dict[Text, _RandomBaseline], Field(max_length=8)]


class _Localisation(_Schema):
    label: Text
    input_box: Box
    area_share: Share
    hit: Annotated[dict[Text, bool | None], Field(max_length=MAX_LIST)]
    mass: Annotated[dict[Text, Share], Field(max_length=MAX_LIST)]


class _Agreement(_Schema):
    a: Text
    b: Text
    spearman: Number
    top_overlap: Share


class _Sanity(_Schema):
    blocks: Annotated[list[Annotated[int, Field(ge=1, le=MAX_COUNT)]], Field(max_length=MAX_LIST)]
    spearman: Annotated[dict[Text, Curve], Field(max_length=MAX_LIST)]
    flagged: Annotated[dict[Text, bool], Field(max_length=MAX_LIST)]
    threshold: Finite


class Evaluation(_Schema):
    """``evaluation``: how far each map reflects what the model uses (shapes checked in _check_record)."""

    maps: Annotated[list[Text], Field(max_length=MAX_LIST)]
    baseline: Literal["mean", "blur", "zero"]
    steps: Annotated[int, Field(ge=1, le=MAX_LIST - 1)]
    random_orders: Count
    target: Text
    reference_score: Number
    forwards: Count
    fractions: Curve
    curves: Annotated[dict[Text, _KindMap], Field(max_length=MAX_LIST)]
    auc: Annotated[dict[Text, Annotated[dict[Text, Number], Field(max_length=8)]], Field(max_length=MAX_LIST)]
    beats_random: Annotated[dict[Text, Annotated[dict[Text, bool], Field(max_length=8)]], Field(max_length=MAX_LIST)]
    random: Annotated[dict[Text, _RandomBaseline], Field(max_length=8)]
    targets: Annotated[list[_ScoredTarget], Field(min_length=1, max_length=MAX_LIST)]
    scored_with: Annotated[dict[Text, Annotated[int, Field(ge=0)]], Field(max_length=MAX_LIST)]
    localisation: Annotated[list[_Localisation], Field(max_length=2 * MAX_OBJECTS)]
    agreement: Annotated[list[_Agreement], Field(max_length=MAX_LIST * MAX_LIST)]
    sanity: _Sanity | None


class Record(_Schema):
    """A cached page record (what :func:`reportgen.site.records.image_record` writes for an image
    that worked). Which sections may be None depends on the methods (checked in _check_record)."""

    # Replaced from the manifest entry when the record is reused, so only their type matters.
    id: str
    title: str
    caption: str
    source_name: str
    # Must be what this entry's slug gives (checked in _check_record).
    slug: Text
    page: Text
    kind: Literal["single", "multi"]
    figures: dict[str, Any]
    error: None  # failed images are never cached
    size: Pair
    content: _Content
    concentration: Annotated[dict[Text, _Concentration], Field(max_length=MAX_LIST)]
    dominant_layers: Annotated[dict[Text, Annotated[list[_LayerPeak], Field(max_length=MAX_LIST)]], Field(max_length=MAX_LIST)]
    norms: _Norms | None
    # Required in the build cache (checked in _check_record); sites written before it was added lack it.
    layer_entropy: Annotated[dict[Text, Annotated[list[Share], Field(max_length=MAX_LIST)]], Field(max_length=MAX_LIST)] | None = None
    attention: _Attention | None
    rollout: _Rollout | None
    objects: _Objects | None
    scales: _Scales
    maps: Annotated[dict[Text, _Map], Field(max_length=MAX_LIST)] | None = None  # maps no section shows
    predictions: Annotated[list[_Prediction], Field(min_length=1, max_length=5)] | None = None  # a classifier's top 5
    evaluation: Evaluation | None = None  # with the evaluation only (checked in _check_record)


class Entry(_Schema):
    key: Text
    record: Record


