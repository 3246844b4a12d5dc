"""Tests for reportgen.model.detector, with a tiny randomly initialised DETR: nothing is downloaded."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # DetrImageProcessor is a torchvision-backed processor in transformers 5

import huggingface_hub.constants as hf_constants  # noqa: E402
from transformers import (  # noqa: E402
    DetrConfig,
    DetrForObjectDetection,
    DetrImageProcessor,
    ResNetConfig,
)

from reportgen.config import ObjectBox  # noqa: E402
from reportgen.errors import ModelLoadError  # noqa: E402
from reportgen.model.detector import DEFAULT_DETECTOR, Detector, load_detector  # noqa: E402

LABELS = {0: "cat", 1: "dog", 2: "cup"}
WIDTH, HEIGHT = 120, 80  # deliberately not square, and not the processor's working size


def tiny_detr() -> DetrForObjectDetection:
    """A ~26k-parameter DETR with a 2-stage ResNet backbone from transformers (no timm, no weights)."""
    backbone = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        out_features=["stage2"],
    )
    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=10,
        num_labels=3,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        # With the default init_std (0.02) all ten queries give the same box and score; a wider
        # init spreads boxes and scores, and pushes boxes past the image borders (tests clipping).
        init_std=0.5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = DetrForObjectDetection(config)
    return model.eval()


def tiny_processor() -> DetrImageProcessor:
    return DetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})


@pytest.fixture(scope="module")
def model() -> DetrForObjectDetection:
    return tiny_detr()


@pytest.fixture(scope="module")
def processor() -> DetrImageProcessor:
    return tiny_processor()


@pytest.fixture(scope="module")
def image() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def by_hand(model, processor, image) -> list[tuple[float, str, tuple[float, float, float, float]]]:
    """Every query's (score, label, clipped box) computed from the raw model outputs, best first."""
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    logits = outputs.logits[0].double()  # (queries, num_labels + 1); the last class is "no object"
    boxes = outputs.pred_boxes[0].double()  # (queries, 4): cx, cy, w, h in [0, 1] of the image
    probs = torch.softmax(logits, dim=-1)[:, :-1]
    scores, labels = probs.max(dim=-1)
    w, h = image.size
    found = []
    for score, label, (cx, cy, bw, bh) in zip(scores.tolist(), labels.tolist(), boxes.tolist()):
        x0, x1 = cx * w - bw * w / 2, cx * w + bw * w / 2
        y0, y1 = cy * h - bh * h / 2, cy * h + bh * h / 2
        clipped = (min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h))
        found.append((score, LABELS[label], clipped))
    return sorted(found, key=lambda item: item[0], reverse=True)


def assert_same_box(box: ObjectBox, expected, *, tol: float = 1e-3) -> None:
    score, label, (x0, y0, x1, y1) = expected
    assert box.label == label
    assert box.score == pytest.approx(score, abs=1e-5)
    assert (box.x0, box.y0, box.x1, box.y1) == pytest.approx((x0, y0, x1, y1), abs=tol)


def test_detect_returns_boxes_in_original_image_pixels(model, processor, image):
    detector = Detector(model, processor, threshold=0.0, name="tiny")
    boxes = detector.detect(image)
    expected = by_hand(model, processor, image)

    assert boxes, "threshold 0 keeps every query"
    assert len(boxes) == len(expected) == model.config.num_queries
    assert all(isinstance(box, ObjectBox) for box in boxes)
    for box in boxes:
        assert 0.0 <= box.x0 < box.x1 <= WIDTH
        assert 0.0 <= box.y0 < box.y1 <= HEIGHT
        assert box.label in LABELS.values()
        assert 0.0 <= box.score <= 1.0
    scores = [box.score for box in boxes]
    assert scores == sorted(scores, reverse=True)

    # The top box, and in fact every box, matches the independent computation.
    assert_same_box(boxes[0], expected[0])
    for box, want in zip(boxes, expected):
        assert_same_box(box, want)


def test_fixture_really_exercises_scaling_and_clipping(model, processor, image):
    """Guards the test above: the tiny model's raw boxes leave the image, and differ from each other."""
    inputs = processor(images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) != (HEIGHT, WIDTH)  # the model sees a resized image
    with torch.no_grad():
        cx, cy, bw, bh = model(**inputs).pred_boxes[0].unbind(-1)
    outside = (cx - bw / 2 < 0) | (cx + bw / 2 > 1) | (cy - bh / 2 < 0) | (cy + bh / 2 > 1)
    assert outside.any()
    assert len({round(float(v), 4) for v in cx}) > 1


def test_threshold_is_inclusive_and_filters(model, processor, image):
    # The threshold is one of the detector's own (float32) scores, not a recomputation of it:
    # a float64 softmax rounded to float32 can differ from it in the last bit.
    everything = Detector(model, processor, threshold=0.0, name="tiny").detect(image)
    scores = [box.score for box in everything]
    cut = scores[3]
    assert 0.0 < cut < 1.0

    # A threshold exactly equal to a score keeps that object (score >= threshold) ...
    at_score = Detector(model, processor, threshold=cut, name="tiny").detect(image)
    assert [box.score for box in at_score] == [s for s in scores if s >= cut]
    assert len(at_score) >= 4 and cut in [box.score for box in at_score]

    # ... and the next float above it drops that object and every one scored lower.
    above = np.nextafter(cut, 2.0)
    over = Detector(model, processor, threshold=float(above), name="tiny").detect(image)
    assert [box.score for box in over] == [s for s in scores if s > cut]
    assert len(over) < len(at_score) and cut not in [box.score for box in over]

    none = Detector(model, processor, threshold=1.0, name="tiny").detect(image)
    assert none == []


def test_detect_accepts_non_rgb_images_and_keeps_global_state(model, processor, image):
    detector = Detector(model, processor, threshold=0.0, name="tiny")
    rng_before = torch.random.get_rng_state()
    grad_before = torch.is_grad_enabled()
    threads_before = torch.get_num_threads()

    gray = detector.detect(image.convert("L"))
    rgba = detector.detect(image.convert("RGBA"))

    assert len(gray) == len(rgba) == model.config.num_queries
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.is_grad_enabled() == grad_before
    assert torch.get_num_threads() == threads_before


def test_detector_rejects_bad_threshold(model, processor):
    with pytest.raises(ValueError):
        Detector(model, processor, threshold=1.5, name="tiny")


def test_load_detector_from_a_local_folder(tmp_path, model, processor, image):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    detector = load_detector(str(tmp_path), 0.0)

    assert isinstance(detector, Detector)
    assert detector.name == str(tmp_path)
    assert detector.threshold == 0.0
    assert not detector.model.training
    assert detector.model.config.id2label == LABELS
    boxes = detector.detect(image)
    expected = by_hand(model, processor, image)
    assert len(boxes) == len(expected)
    for box, want in zip(boxes, expected):
        assert_same_box(box, want)


def assert_helpful(err: ModelLoadError, name: str) -> None:
    message = str(err)
    assert name in message
    assert "\n" not in message  # one paragraph
    assert "Hugging Face hub" in message and "cache" in message
    assert "HF_HOME" in message
    assert "--detector none" in message
    assert "--detector PATH" in message and "save_pretrained" in message
    assert err.__cause__ is not None


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point the Hugging Face cache at an empty folder, so a developer's real cache cannot make loading succeed.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE once, at import, so the constant is patched too.
    """
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("name", [DEFAULT_DETECTOR, "no-such-org/no-such-detr-model"])
def test_load_detector_offline_mode_raises_model_load_error(name, monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        load_detector(name, 0.9)
    assert time.monotonic() - started < 5
    assert_helpful(caught.value, name)
    assert "offline" in str(caught.value)


def test_load_detector_unknown_name_without_offline_mode_fails_fast(monkeypatch, empty_hf_cache):
    """No HF_HUB_OFFLINE: one request to the hub, no retry loop (huggingface_hub's takes ~25 s offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_ETAG_TIMEOUT", 3)  # bounds the one request if packets are dropped
    name = "no-such-org/no-such-detr-model"
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        load_detector(name, 0.9)
    assert time.monotonic() - started < 10
    assert_helpful(caught.value, name)


def test_load_detector_missing_or_empty_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "detector"
    with pytest.raises(ModelLoadError) as caught:
        load_detector(str(missing), 0.5)
    assert str(missing) in str(caught.value)
    assert "--detector none" in str(caught.value)

    with pytest.raises(ModelLoadError) as caught:
        load_detector(str(tmp_path), 0.5)
    assert f"local folder {tmp_path}" in str(caught.value)


def test_unavailable_reason_names_folders_as_given(tmp_path, monkeypatch, empty_hf_cache):
    """The one-line reason published on the site names no local path the user did not write."""
    from reportgen.model.detector import DetectorUnavailable

    home = tmp_path / "home"
    (home / "detr").mkdir(parents=True)  # there, but empty
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(DetectorUnavailable) as caught:
        load_detector("~/detr", 0.5)
    reason = caught.value.reason
    assert reason.startswith("could not be loaded from the local folder ~/detr: ") and "model.safetensors" in reason
    assert str(tmp_path) not in reason and "\n" not in reason
    assert str(home / "detr") in str(caught.value)  # the build's own message gives the full path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DetectorUnavailable) as caught:
        load_detector("no-such-org/no-such-detr-model", 0.5)
    assert "offline mode is on" in caught.value.reason and str(tmp_path) not in caught.value.reason
