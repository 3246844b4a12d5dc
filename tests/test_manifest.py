"""Tests for reportgen.config: loading, defaults, validation messages, slugs, overrides."""

from __future__ import annotations

import json
import re
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from reportgen.config import (
    HEAD_FUSIONS,
    MAX_ID_LENGTH,
    AttentionSettings,
    DetectorSettings,
    ImageEntry,
    Manifest,
    ModelSettings,
    ObjectBox,
    OutputSettings,
    load_manifest,
    slugify,
)
from reportgen.errors import ManifestError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "images" / "manifest.yaml"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_image(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)
    return path


def write_manifest(folder: Path, text: str, name: str = "manifest.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    error = info.value
    # Every error names the manifest file, and its message lists every problem.
    assert str(error).startswith(str(path.resolve()))
    assert Path(error.path) == path.resolve()
    for problem in error.problems:
        assert problem in str(error)
    return error.problems


def only_problem(path: Path) -> str:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_image(tmp_path / "cat.png")
    make_image(tmp_path / "dog.png")
    return tmp_path


# --------------------------------------------------------------------------------------------
# the sample manifest
# --------------------------------------------------------------------------------------------


def test_sample_manifest_loads():
    manifest = load_manifest(SAMPLE)
    assert manifest.path == SAMPLE
    assert len(manifest.images) >= 5
    assert {image.kind for image in manifest.images} == {"single", "multi"}
    # The sample must run without the hub: offline model, no detector.
    assert manifest.model.name == "imgfocus-vits14"
    assert manifest.model.input_size == 224
    assert manifest.detector.name is None
    assert len({image.slug for image in manifest.images}) == len(manifest.images)


def test_sample_boxes_are_valid_and_inside_the_images():
    manifest = load_manifest(SAMPLE)
    by_id = {image.id: image for image in manifest.images}
    for image in manifest.images:
        assert image.title and image.caption, image.id
        with Image.open(image.path) as raw:
            width, height = ImageOps.exif_transpose(raw).size
        for box in image.objects:
            assert box.label.strip()
            assert box.score is None
            assert 0 <= box.x0 < box.x1 <= width, (image.id, box)
            assert 0 <= box.y0 < box.y1 <= height, (image.id, box)
        if image.kind == "multi":
            assert 2 <= len(image.objects) <= 4, image.id
    # The rocket is a small object: its box must be a small part of the frame.
    rocket = by_id["rocket"]
    assert len(rocket.objects) == 1 and rocket.objects[0].label == "rocket"
    with Image.open(rocket.path) as raw:
        assert rocket.objects[0].area < 0.05 * raw.width * raw.height
    assert by_id["chelsea"].objects
    # At least one image has two objects of the same kind (the motorcycle's wheels).
    assert any(
        len([b.label for b in image.objects]) > len({b.label for b in image.objects}) for image in manifest.images
    )


def test_sample_images_have_licence_notes():
    notes = (REPO / "images" / "LICENSE.md").read_text(encoding="utf-8")
    for image in load_manifest(SAMPLE).images:
        assert image.path.name in notes


# --------------------------------------------------------------------------------------------
# defaults and paths
# --------------------------------------------------------------------------------------------


def test_defaults(folder: Path):
    path = write_manifest(folder, "images:\n  - path: cat.png\n")
    manifest = load_manifest(path)
    assert manifest.model == ModelSettings()
    assert manifest.model.name == "vit_base_patch16_224"
    assert manifest.model.weights is None and manifest.model.input_size is None
    assert manifest.model.pretrained is True and dict(manifest.model.options) == {}
    assert manifest.attention == AttentionSettings(head_fusion="mean", discard_ratio=0.0, rollout_start_layer=1)
    assert manifest.detector == DetectorSettings(name="facebook/detr-resnet-50", threshold=0.9)
    assert manifest.output == OutputSettings(dir=None, title="reportgen report", cmap="inferno", alpha=0.5,
                                             scale="map", scale_percentile=99.0)
    (image,) = manifest.images
    assert image == ImageEntry(
        index=0,
        id="cat",
        slug="cat",
        path=(folder / "cat.png").resolve(),
        title="cat",
        caption="",
        kind="single",
        objects=(),
    )


def test_empty_sections_mean_defaults(folder: Path):
    path = write_manifest(folder, "model:\nattention:\ndetector: {}\noutput:\nimages:\n  - path: cat.png\n")
    manifest = load_manifest(path)
    assert manifest.model == ModelSettings() and manifest.output == OutputSettings()


def test_full_manifest(folder: Path):
    (folder / "weights.safetensors").write_bytes(b"not really weights")
    path = write_manifest(
        folder,
        """
        title: My report
        model: {name: vit_tiny_patch16_224, weights: weights.safetensors, input_size: 96,
                pretrained: false, options: {depth: 2, embed_dim: 64, global_pool: token, mlp_ratio: 2}}
        attention: {head_fusion: max, discard_ratio: 0.5}
        detector: {name: hustvl/yolos-tiny, threshold: 1}
        output: {dir: site, cmap: viridis, alpha: 1}
        images:
          - path: cat.png
            id: Kitty
            title: "<b>Kitty</b> & co"
            caption: "  spaces kept  "
            kind: multi
            objects:
              - {label: cat, box: [1, 2.5, 30, 40]}
              - {label: "<script>", box: [0, 0, 64, 48]}
        """,
    )
    manifest = load_manifest(path)
    assert manifest.output.title == "My report"
    assert manifest.model == ModelSettings(
        name="vit_tiny_patch16_224",
        weights=(folder / "weights.safetensors").resolve(),
        input_size=96,
        pretrained=False,
        options={"depth": 2, "embed_dim": 64, "global_pool": "token", "mlp_ratio": 2},
    )
    assert manifest.attention == AttentionSettings("max", 0.5)
    assert manifest.detector == DetectorSettings("hustvl/yolos-tiny", 1.0)
    assert manifest.output.dir == (folder / "site").resolve()
    assert (manifest.output.cmap, manifest.output.alpha) == ("viridis", 1.0)
    (image,) = manifest.images
    assert (image.id, image.slug, image.kind) == ("Kitty", "kitty", "multi")
    # Text is kept verbatim: escaping is the templates' job.
    assert image.title == "<b>Kitty</b> & co" and image.caption == "  spaces kept  "
    assert image.objects == (ObjectBox("cat", 1.0, 2.5, 30.0, 40.0), ObjectBox("<script>", 0.0, 0.0, 64.0, 48.0))
    box = image.objects[0]
    assert isinstance(box.x0, float)
    assert (box.width, box.height, box.area) == (29.0, 37.5, 29.0 * 37.5)
    assert box.as_tuple() == (1.0, 2.5, 30.0, 40.0)


def test_output_title_key(folder: Path):
    path = write_manifest(folder, "output: {title: Inner}\nimages: [{path: cat.png}]\n")
    assert load_manifest(path).output.title == "Inner"


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "null", "~"])
def test_detector_none(folder: Path, spelling: str):
    path = write_manifest(folder, f"detector: {{name: {spelling}}}\nimages: [{{path: cat.png}}]\n")
    assert load_manifest(path).detector.name is None


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path, monkeypatch):
    make_image(tmp_path / "pictures" / "cat.png")
    absolute = make_image(tmp_path / "elsewhere" / "dog.png")
    path = write_manifest(
        tmp_path / "project" / "config",
        f"""
        output: {{dir: ../site}}
        images:
          - path: ../../pictures/cat.png
          - path: {absolute}
        """,
    )
    # The working directory must not matter.
    monkeypatch.chdir(tmp_path / "elsewhere")
    manifest = load_manifest(Path("..") / "project" / "config" / "manifest.yaml")
    assert manifest.path == path
    assert manifest.path.is_absolute()
    assert [image.path for image in manifest.images] == [tmp_path / "pictures" / "cat.png", absolute]
    assert all(image.path.is_absolute() for image in manifest.images)
    assert manifest.output.dir == tmp_path / "project" / "site"
    assert [image.id for image in manifest.images] == ["cat", "dog"]


def test_load_accepts_str_paths(folder: Path):
    path = write_manifest(folder, "images: [{path: cat.png}]\n")
    assert load_manifest(str(path)) == load_manifest(path)


# --------------------------------------------------------------------------------------------
# problems: each names the manifest file, the entry and the key
# --------------------------------------------------------------------------------------------


def test_missing_manifest_file(tmp_path: Path):
    problem = only_problem(tmp_path / "nope.yaml")
    assert "not found" in problem


def test_manifest_is_a_directory(tmp_path: Path):
    assert "directory" in only_problem(tmp_path)


def test_unreadable_manifest(folder: Path):
    path = write_manifest(folder, "images: [{path: cat.png}]\n")
    path.chmod(0)
    try:
        try:
            path.read_bytes()
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: permissions are not enforced")
        assert "permission denied" in only_problem(path)
    finally:
        path.chmod(0o644)


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "manifest.yaml"
    path.write_bytes(b"images:\n  - path: caf\xe9.png\n")
    assert "line 2" in only_problem(path)


def test_invalid_yaml_reports_line_and_column(folder: Path):
    path = write_manifest(folder, "images:\n  - path: cat.png\n    title: [unclosed\n  - path: dog.png\n")
    problem = only_problem(path)
    assert problem.startswith("invalid YAML at line ")
    assert re.search(r"line \d+, column \d+", problem)

    path = write_manifest(folder, "images:\n  - path: cat.png\n bad: indent\n")
    assert "line 3, column 2" in only_problem(path)

    path = write_manifest(folder, "images:\n\t- path: cat.png\n")
    assert "line 2" in only_problem(path)


def test_control_characters_are_invalid_yaml(folder: Path):
    path = write_manifest(folder, "images:\n  - path: cat.png\n    title: a\x01b\n")
    assert "line 3" in only_problem(path)


def test_unsafe_tags_are_rejected(folder: Path):
    path = write_manifest(folder, "images: !!python/object/apply:os.system [echo hi]\n")
    assert "invalid YAML at line 1" in only_problem(path)


def test_several_documents(folder: Path):
    path = write_manifest(folder, "images: [{path: cat.png}]\n---\nimages: []\n")
    assert "single document" in only_problem(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- path: cat.png\n", "top level: expected a mapping"),
        ("just text\n", "top level: expected a mapping"),
        ("model: {}\n", "images: missing"),
        ("images:\n", "images: the list is empty"),
        ("images: cat.png\n", "images: expected a list"),
        ("images: {path: cat.png}\n", "images: expected a list"),
        ("images: []\n", "images: the list is empty"),
    ],
)
def test_top_level_problems(folder: Path, text: str, expected: str):
    assert expected in only_problem(write_manifest(folder, text))


@pytest.mark.parametrize(
    "section, expected",
    [
        ("model: {name: ''}", "model.name: must not be empty"),
        ("model: {name: 42}", "model.name: expected a string, got 42"),
        ("model: {input_size: big}", "model.input_size: expected a positive integer, got 'big'"),
        ("model: {input_size: true}", "model.input_size: expected a positive integer, got true"),
        ("model: {input_size: 0}", "model.input_size: expected a positive integer, got 0"),
        ("model: {input_size: -16}", "model.input_size: expected a positive integer, got -16"),
        ("model: {input_size: 224.0}", "model.input_size: expected a positive integer, got 224.0"),
        ("model: {input_size: 100000}", "model.input_size: 100000 is too large"),
        ("model: {pretrained: maybe}", "model.pretrained: expected true or false, got 'maybe'"),
        ("model: {pretrained: 1}", "model.pretrained: expected true or false, got 1"),
        ("model: {weights: missing.pt}", "model.weights: weights file not found: 'missing.pt'"),
        ("model: {weights: [a]}", "model.weights: expected a string"),
        ("model: {options: [depth, 2]}", "model.options: expected a mapping"),
        ("model: {options: {img_size: 96}}", "model.options.img_size: set this with model.input_size"),
        ("model: {options: {pretrained: true}}", "model.options.pretrained: set this with model.pretrained"),
        ("model: {options: {depth: {a: 1}}}", "model.options.depth: expected a number, string"),
        ("model: {options: {2x: 1}}", "model.options: '2x' is not a valid keyword argument name"),
        ("model: vit_base_patch16_224", "model: expected a mapping, got 'vit_base_patch16_224'"),
        ("attention: {head_fusion: avg}", "attention.head_fusion: expected one of mean, max, min, got 'avg'"),
        ("attention: {discard_ratio: 1}", "attention.discard_ratio: must satisfy 0 <= value < 1, got 1"),
        ("attention: {discard_ratio: -0.1}", "attention.discard_ratio: must satisfy 0 <= value < 1, got -0.1"),
        ("attention: {discard_ratio: half}", "attention.discard_ratio: expected a number, got 'half'"),
        ("attention: {discard_ratio: .nan}", "attention.discard_ratio: expected a finite number"),
        ("attention: {discard_ratio: false}", "attention.discard_ratio: expected a number, got false"),
        ("attention: {rollout_start_layer: 0}", "attention.rollout_start_layer: expected a positive integer, got 0"),
        ("attention: {rollout_start_layer: 2.5}", "attention.rollout_start_layer: expected a positive integer, got 2.5"),
        ("attention: {rollout_start_layer: true}", "attention.rollout_start_layer: expected a positive integer, got true"),
        ("detector: {threshold: 0}", "detector.threshold: must satisfy 0 < value <= 1, got 0"),
        ("detector: {threshold: 1.5}", "detector.threshold: must satisfy 0 < value <= 1, got 1.5"),
        ("detector: {name: ''}", "detector.name: must not be empty"),
        ("detector: {name: [detr]}", "detector.name: expected a string"),
        ("output: {alpha: 0}", "output.alpha: must satisfy 0 < value <= 1, got 0"),
        ("output: {alpha: .inf}", "output.alpha: expected a finite number"),
        ("output: {cmap: infernoo}", "output.cmap: unknown matplotlib colour map 'infernoo'; did you mean 'inferno'"),
        ("output: {cmap: 3}", "output.cmap: expected a string, got 3"),
        ("output: {dir: cat.png}", "output.dir: 'cat.png' (resolved to "),
        ("output: {title: 2024-01-01}", "output.title: expected a string, got datetime.date(2024, 1, 1) (put it in quotes"),
        ("title: [a, b]", "title: expected a string, got ['a', 'b']"),
        ("title: A\noutput: {title: B}", "title: given both as 'title' and as 'output.title'"),
    ],
)
def test_settings_problems(folder: Path, section: str, expected: str):
    path = write_manifest(folder, f"{section}\nimages: [{{path: cat.png}}]\n")
    assert expected in only_problem(path)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("cat.png", "images[0]: expected a mapping with at least a 'path' key, got 'cat.png'"),
        ("{id: a}", "images[0] (id 'a'): missing required key 'path'"),
        ("{path: 3}", "images[0]: path: expected a string, got 3"),
        ("{path: ''}", "images[0]: path: must not be empty"),
        ("{path: nope.png}", "images[0] (id 'nope'): path: image file not found: 'nope.png' (resolved to "),
        ("{path: sub}", "images[0] (id 'sub'): path: 'sub' (resolved to "),
        ("{path: cat.png, id: 5}", "images[0]: id: expected a string, got 5"),
        ("{path: cat.png, id: ''}", "images[0]: id: must not be empty"),
        ("{path: cat.png, id: '   '}", "images[0]: id: must not be empty"),
        ("{path: cat.png, id: yes}", "images[0]: id: expected a string, got true (put it in quotes"),
        ("{path: cat.png, title: 7}", "images[0] (id 'cat'): title: expected a string, got 7"),
        ("{path: cat.png, caption: [x]}", "images[0] (id 'cat'): caption: expected a string, got ['x']"),
        ("{path: cat.png, kind: many}", "images[0] (id 'cat'): kind: expected one of single, multi, got 'many'"),
        ("{path: cat.png, objects: cat}", "images[0] (id 'cat'): objects: expected a list"),
        ("{path: cat.png, objects: [cat]}", "images[0] (id 'cat'): objects[0]: expected a mapping with 'label' and 'box'"),
        ("{path: cat.png, objects: [{box: [0, 0, 1, 1]}]}", "images[0] (id 'cat'): objects[0]: missing required key 'label'"),
        ("{path: cat.png, objects: [{label: '', box: [0, 0, 1, 1]}]}", "images[0] (id 'cat'): objects[0].label: must not be empty"),
        ("{path: cat.png, objects: [{label: 3, box: [0, 0, 1, 1]}]}", "images[0] (id 'cat'): objects[0].label: expected a string, got 3"),
        ("{path: cat.png, objects: [{label: c}]}", "images[0] (id 'cat'): objects[0].box: missing"),
        ("{path: cat.png, objects: [{label: c, box: [0, 0, 1]}]}", "images[0] (id 'cat'): objects[0].box: expected a list of 4 numbers"),
        ("{path: cat.png, objects: [{label: c, box: [0, 0, 1, 1, 1]}]}", "images[0] (id 'cat'): objects[0].box: expected a list of 4 numbers"),
        ("{path: cat.png, objects: [{label: c, box: '0 0 1 1'}]}", "images[0] (id 'cat'): objects[0].box: expected a list of 4 numbers"),
        ("{path: cat.png, objects: [{label: c, box: [0, a, 1, 1]}]}", "images[0] (id 'cat'): objects[0].box: y0 must be a number, got 'a'"),
        ("{path: cat.png, objects: [{label: c, box: [0, 0, true, 1]}]}", "images[0] (id 'cat'): objects[0].box: x1 must be a number, got true"),
        ("{path: cat.png, objects: [{label: c, box: [-1, 0, 1, 1]}]}", "images[0] (id 'cat'): objects[0].box: x0 must not be negative, got -1"),
        ("{path: cat.png, objects: [{label: c, box: [0, 0, .inf, 1]}]}", "images[0] (id 'cat'): objects[0].box: x1 must be a finite number"),
        ("{path: cat.png, objects: [{label: c, box: [0, .nan, 1, 1]}]}", "images[0] (id 'cat'): objects[0].box: y0 must be a finite number"),
        ("{path: cat.png, objects: [{label: c, box: [90, 0, 40, 10]}]}", "images[0] (id 'cat'): objects[0].box: x1 (40) must be greater than x0 (90)"),
        ("{path: cat.png, objects: [{label: c, box: [0, 9, 4, 2.5]}]}", "images[0] (id 'cat'): objects[0].box: y1 (2.5) must be greater than y0 (9)"),
        ("{path: cat.png, objects: [{label: c, box: [5, 0, 5, 10]}]}", "images[0] (id 'cat'): objects[0].box: x1 (5) must be greater than x0 (5): the box has zero width"),
        ("{path: cat.png, objects: [{label: c, box: [0, 3, 5, 3]}]}", "images[0] (id 'cat'): objects[0].box: y1 (3) must be greater than y0 (3): the box has zero height"),
    ],
)
def test_image_problems(folder: Path, entry: str, expected: str):
    (folder / "sub").mkdir()
    path = write_manifest(folder, f"images:\n  - {entry}\n")
    assert expected in only_problem(path)


def test_missing_image_names_written_and_resolved_path(tmp_path: Path):
    path = write_manifest(tmp_path / "m", "images:\n  - {id: coffee, path: ../pics/coffee.jpg}\n")
    problem = only_problem(path)
    assert problem.startswith("images[0] (id 'coffee'): path:")
    assert "'../pics/coffee.jpg'" in problem
    assert str(tmp_path / "pics" / "coffee.jpg") in problem


def test_boxes_outside_the_image_are_not_checked_here(folder: Path):
    # cat.png is 64x48; bounds are checked once the image is decoded, not by the loader.
    path = write_manifest(folder, "images:\n  - {path: cat.png, objects: [{label: c, box: [10, 10, 5000, 5000]}]}\n")
    assert load_manifest(path).images[0].objects[0].x1 == 5000.0


def test_several_problems_are_reported_at_once(folder: Path):
    path = write_manifest(
        folder,
        """
        model: {input_size: big}
        attention: {head_fusion: avg}
        images:
          - path: cat.png
            id: coffee
            objects:
              - {label: cup, box: [0, 0, 10, 10]}
              - {label: saucer, box: [90, 0, 40, 10]}
          - path: missing.png
          - {path: dog.png, kind: triple}
        """,
    )
    problems = problems_of(path)
    assert problems == [
        "model.input_size: expected a positive integer, got 'big'",
        "attention.head_fusion: expected one of mean, max, min, got 'avg'",
        "images[0] (id 'coffee'): objects[1].box: x1 (40) must be greater than x0 (90)",
        f"images[1] (id 'missing'): path: image file not found: 'missing.png' (resolved to {folder / 'missing.png'})",
        "images[2] (id 'dog'): kind: expected one of single, multi, got 'triple'",
    ]
    message = str(ManifestError(path, problems))
    assert "5 problems" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("imagez: []\nimages: [{path: cat.png}]\n",
         "top level: unknown key 'imagez' (allowed: attention, detector, evaluate, images, methods, model, output, title)"),
        ("model: {nmae: x}\nimages: [{path: cat.png}]\n",
         "model: unknown key 'nmae' (allowed: input_size, name, options, pretrained, weights)"),
        ("attention: {fusion: max}\nimages: [{path: cat.png}]\n",
         "attention: unknown key 'fusion' (allowed: discard_ratio, head_fusion, object_targets, rollout_start_layer, target_classes)"),
        ("detector: {thresh: 0.5}\nimages: [{path: cat.png}]\n",
         "detector: unknown key 'thresh' (allowed: name, threshold)"),
        ("output: {colormap: jet}\nimages: [{path: cat.png}]\n",
         "output: unknown key 'colormap' (allowed: alpha, cmap, dir, scale, scale_percentile, title)"),
        ("images: [{path: cat.png, captoin: x}]\n",
         "images[0] (id 'cat'): unknown key 'captoin' (allowed: caption, id, kind, objects, path, title)"),
        ("images: [{path: cat.png, objects: [{label: c, box: [0, 0, 1, 1], score: 1}]}]\n",
         "images[0] (id 'cat'): objects[0]: unknown key 'score' (allowed: box, label)"),
        ("1: x\nimages: [{path: cat.png}]\n", "top level: unknown key 1 (allowed:"),
        ("null: x\nimages: [{path: cat.png}]\n", "top level: unknown key null (allowed:"),
    ],
)
def test_unknown_keys(folder: Path, text: str, expected: str):
    assert expected in only_problem(write_manifest(folder, text))


def test_unknown_key_without_id(folder: Path):
    path = write_manifest(folder, "images: [{path: '', captoin: x}]\n")
    assert "images[0]: unknown key 'captoin' (allowed: caption, id, kind, objects, path, title)" in problems_of(path)


def test_duplicate_keys_are_reported_with_their_line(folder: Path):
    path = write_manifest(folder, "images:\n  - path: cat.png\n    kind: multi\n    kind: single\n")
    assert only_problem(path) == "line 4, column 5: duplicate key 'kind' (only the last one would be used)"


def test_merge_keys_are_not_duplicates(folder: Path):
    path = write_manifest(
        folder,
        """
        images:
          - &base {path: cat.png, kind: multi, id: a}
          - {<<: *base, id: b}
        """,
    )
    assert [(i.id, i.kind) for i in load_manifest(path).images] == [("a", "multi"), ("b", "multi")]


def test_duplicate_ids_name_both_entries(folder: Path):
    path = write_manifest(
        folder,
        """
        images:
          - {path: cat.png, id: pet}
          - {path: dog.png}
          - {path: dog.png, id: pet}
        """,
    )
    assert only_problem(path) == "images[2] (id 'pet'): id: duplicate id 'pet', also used by images[0]"


def test_duplicate_ids_from_file_names(folder: Path):
    make_image(folder / "other" / "cat.png")
    path = write_manifest(folder, "images:\n  - path: cat.png\n  - path: other/cat.png\n")
    problem = only_problem(path)
    assert problem.startswith("images[1] (id 'cat'): id: duplicate id 'cat', also used by images[0]")
    assert "file name" in problem


def test_duplicate_ids_found_even_when_entries_have_other_problems(folder: Path):
    path = write_manifest(folder, "images:\n  - {path: cat.png, id: a, kind: x}\n  - {path: dog.png, id: a}\n")
    problems = problems_of(path)
    assert len(problems) == 2
    assert "also used by images[0]" in problems[1]


def test_ids_differing_in_case_are_distinct_but_slugs_stay_unique(folder: Path):
    path = write_manifest(folder, "images:\n  - {path: cat.png, id: Cat}\n  - {path: dog.png, id: cat}\n")
    assert [(i.id, i.slug) for i in load_manifest(path).images] == [("Cat", "cat"), ("cat", "cat-2")]


# --------------------------------------------------------------------------------------------
# slugs
# --------------------------------------------------------------------------------------------

SAFE_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def test_slugs_are_safe_and_unique_for_nasty_ids(folder: Path):
    nasty = ["../../x", "/abs", "/etc/passwd", "a/b", "a\\b", "..", ".", ".hidden", "index", "results", "INDEX",
             "Café 猫", "猫", "🐱", "🐶", "A b", "a-b", "a b", "x" * (MAX_ID_LENGTH - 1), "x" * (MAX_ID_LENGTH - 1) + "y", "con", "a..b", "-", "_x_"]
    # JSON strings are valid double-quoted YAML strings.
    entries = "\n".join(f"  - {{path: cat.png, id: {json.dumps(i, ensure_ascii=False)}}}" for i in nasty)
    path = write_manifest(folder, f"images:\n{entries}\n")
    images = load_manifest(path).images
    assert [image.id for image in images] == nasty
    slugs = [image.slug for image in images]
    assert len(set(slugs)) == len(slugs)
    for slug in slugs:
        assert SAFE_SLUG.match(slug), slug
        assert ".." not in slug and len(slug) <= 80
        assert slug not in {"index", "results"}
        # The slug must name a file inside the output folder, whatever is appended to it.
        assert Path(slug).name == slug and Path(slug + ".html").parent == Path(".")
    by_id = dict(zip(nasty, slugs))
    assert by_id["index"] == "index-image" and by_id["results"] == "results-image"
    assert by_id["Café 猫"].startswith("cafe")
    assert by_id["../../x"] == "x"
    assert by_id["a/b"] == "a-b"
    assert by_id["A b"].startswith("a-b-") and by_id["a-b"].startswith("a-b-")


def test_colliding_slugs_get_numbered_in_manifest_order(folder: Path):
    path = write_manifest(folder, "images:\n  - {path: cat.png, id: A b}\n  - {path: cat.png, id: a-b}\n"
                                  "  - {path: cat.png, id: a-b-2}\n  - {path: cat.png, id: A--B}\n")
    assert [image.slug for image in load_manifest(path).images] == ["a-b", "a-b-2", "a-b-2-2", "a-b-3"]


def test_empty_id_is_an_error_but_empty_slug_is_impossible():
    assert slugify("") == "image"
    assert slugify("///") == "image"
    assert slugify("index") == "index-image"
    assert slugify("Index.HTML") == "index-image.html"
    assert slugify("CON.txt") == "con-image.txt"
    assert slugify("results-2") == "results-2"


@given(st.text(max_size=120))
@settings(max_examples=200, deadline=None)
def test_slugify_is_always_safe(text: str):
    slug = slugify(text)
    assert SAFE_SLUG.match(slug) and ".." not in slug and len(slug) <= 80
    assert slug not in {"", ".", ".."} and slug.split(".")[0] not in {"index", "results", "con", "nul"}


# --------------------------------------------------------------------------------------------
# overrides
# --------------------------------------------------------------------------------------------


def test_with_overrides(folder: Path):
    manifest = load_manifest(write_manifest(folder, "images: [{path: cat.png}]\n"))
    changed = manifest.with_overrides(
        model={"name": "vit_tiny_patch16_224", "pretrained": False, "options": {"depth": 2}},
        attention={"head_fusion": "min"},
        detector={"threshold": 0.5, "name": None},
        output={"dir": folder / "out", "alpha": 1},
    )
    assert changed.model.name == "vit_tiny_patch16_224" and changed.model.pretrained is False
    assert dict(changed.model.options) == {"depth": 2}
    assert changed.attention.head_fusion == "min"
    assert (changed.detector.name, changed.detector.threshold) == (None, 0.5)
    assert changed.output.dir == folder / "out" and changed.output.alpha == 1.0
    # Untouched fields and the original manifest stay as they were.
    assert changed.model.input_size is None and changed.output.cmap == "inferno"
    assert changed.images == manifest.images and changed.path == manifest.path
    assert manifest.model == ModelSettings() and manifest.detector == DetectorSettings()
    assert manifest.with_overrides() == manifest
    assert manifest.with_overrides(model={}, output=None) == manifest


@pytest.mark.parametrize(
    "overrides",
    [
        {"modle": {"name": "x"}},
        {"images": {"x": 1}},
        {"model": {"nmae": "x"}},
        {"detector": {"threshold": 2}},
        {"attention": {"head_fusion": "avg"}},
        {"model": {"input_size": True}},
        {"output": {"alpha": 0}},
        {"output": {"cmap": "no-such-map"}},
    ],
)
def test_with_overrides_rejects_unknown_or_invalid(folder: Path, overrides: dict):
    manifest = load_manifest(write_manifest(folder, "images: [{path: cat.png}]\n"))
    with pytest.raises(ValueError):
        manifest.with_overrides(**overrides)


def test_settings_are_frozen():
    model = ModelSettings(options={"depth": 2})
    with pytest.raises(AttributeError):
        model.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        model.options["depth"] = 3  # type: ignore[index]
    assert hash(model) == hash(ModelSettings(options={"depth": 5}))  # hashable despite the mapping
    assert set(HEAD_FUSIONS) == {"mean", "max", "min"}


# --------------------------------------------------------------------------------------------
# property test: any file content gives a Manifest or a ManifestError, nothing else
# --------------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.dates(),
    st.sampled_from(["cat.png", "dog.png", "missing.png", "", "none", "mean", "multi", "single", "inferno"]),
)
_keys = st.one_of(
    st.sampled_from(
        ["images", "model", "attention", "detector", "output", "title", "path", "id", "kind", "objects",
         "label", "box", "name", "input_size", "options", "weights", "pretrained", "head_fusion",
         "discard_ratio", "rollout_start_layer", "threshold", "dir", "cmap", "alpha", "caption"]
    ),
    st.text(max_size=8),
    st.integers(),
    st.none(),
    st.booleans(),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(_keys, children, max_size=6)),
    max_leaves=30,
)


def _mostly(valid, junk=_values):
    """Usually a valid value (so whole manifests often load), sometimes anything at all."""
    return st.integers(0, 5).flatmap(lambda n: junk if n == 0 else valid)


_box = st.lists(st.floats(0, 1000), min_size=2, max_size=2).flatmap(
    lambda xs: st.lists(st.floats(0, 1000), min_size=2, max_size=2).map(
        lambda ys: [min(xs), min(ys), max(xs) + 1, max(ys) + 1]
    )
)
_objects = st.lists(
    _mostly(st.fixed_dictionaries({"label": _mostly(st.text(min_size=1, max_size=5)), "box": _mostly(_box)})),
    max_size=3,
)
_image = _mostly(
    st.fixed_dictionaries(
        {"path": _mostly(st.sampled_from(["cat.png", "dog.png", "./cat.png", "missing.png", "../m/dog.png"]))},
        optional={
            "id": _mostly(st.text(max_size=10)),
            "title": _mostly(st.text(max_size=10)),
            "caption": _mostly(st.text(max_size=10)),
            "kind": _mostly(st.sampled_from(["single", "multi"])),
            "objects": _mostly(_objects),
        },
    )
)
_options = st.dictionaries(
    st.sampled_from(["depth", "embed_dim", "global_pool", "num_heads"]),
    st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=3), st.none()),
    max_size=3,
)
# Manifest-shaped documents reach deep into the validation; arbitrary values test the edges.
_manifests = _mostly(
    st.fixed_dictionaries(
        {"images": _mostly(st.lists(_image, min_size=1, max_size=4))},
        optional={
            "title": _mostly(st.text(max_size=10)),
            "model": _mostly(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": _mostly(st.sampled_from(["vit_tiny_patch16_224", "imgfocus-vits14"])),
                        "input_size": _mostly(st.integers(1, 1024)),
                        "pretrained": _mostly(st.booleans()),
                        "weights": _scalars,
                        "options": _mostly(_options),
                    },
                )
            ),
            "attention": _mostly(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "head_fusion": _mostly(st.sampled_from(HEAD_FUSIONS)),
                        "discard_ratio": _mostly(st.floats(0, 0.99)),
                        "rollout_start_layer": _mostly(st.integers(1, 4)),
                    },
                )
            ),
            "detector": _mostly(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": _mostly(st.sampled_from(["none", "facebook/detr-resnet-50"])),
                        "threshold": _mostly(st.floats(0.01, 1)),
                    },
                )
            ),
            "output": _mostly(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "dir": _mostly(st.sampled_from(["site", "../out", "cat.png"])),
                        "title": _mostly(st.text(max_size=10)),
                        "cmap": _mostly(st.sampled_from(["inferno", "viridis", "gray_r", "nope"])),
                        "alpha": _mostly(st.floats(0.01, 1)),
                    },
                )
            ),
        },
    )
)


def _dump(value) -> str | None:
    try:
        return yaml.safe_dump(value, allow_unicode=True, sort_keys=False)
    except (yaml.YAMLError, ValueError, OverflowError, TypeError):  # e.g. ints beyond repr's digit limit
        return None


def _check_load(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        make_image(folder / "cat.png", (8, 8))
        make_image(folder / "dog.png", (8, 8))
        path = folder / "manifest.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            manifest = load_manifest(path)
        except ManifestError as error:
            assert error.problems
            assert all(isinstance(p, str) and p for p in error.problems)
            # The catch-all would hide a bug in the validator: it must never be needed.
            assert not any(p.startswith("unexpected error") for p in error.problems), error.problems
        else:
            assert isinstance(manifest, Manifest)
            assert len({image.slug for image in manifest.images}) == len(manifest.images)


@given(_manifests)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_yaml_values_give_a_manifest_or_a_manifest_error(value):
    text = _dump(value)
    if text is not None:
        _check_load(text)


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_arbitrary_text_gives_a_manifest_or_a_manifest_error(text: str):
    _check_load(text)


@given(st.text(alphabet=" \t\n-:[]{},'\"&*!|>%@`#?~.0123456789aex", max_size=200))
@settings(max_examples=200, deadline=None)
def test_yaml_punctuation_soup_gives_a_manifest_or_a_manifest_error(text: str):
    _check_load(text)
