"""Issue 12: one declarative config model for the manifest, the command line and the build options.

Each rule exists once: the manifest, ``Manifest.with_overrides`` and the command line refuse the
same values with the same words; ``methods:`` / ``--methods`` choose the map methods by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import TINY_MODEL, write_manifest, write_photo

import reportgen.builder
from reportgen.cli import main
from reportgen.config import BuildOptions, SettingsError, load_manifest
from reportgen.errors import ManifestError
from reportgen.methods import DEFAULT_METHODS, METHODS


def _cli(manifest, out, *args):
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--quiet", *args])


def _problems(manifest: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    return info.value.problems


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return write_photo(tmp_path / "a.png")


# --------------------------------------------------------------------------------------------
# methods: in the manifest
# --------------------------------------------------------------------------------------------


def test_methods_default_and_all(tmp_path, photo):
    assert load_manifest(write_manifest(tmp_path, [{"path": "a.png"}])).methods == DEFAULT_METHODS
    assert load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], methods="all")).methods == tuple(METHODS)
    assert load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], methods=["rollout"])).methods == ("rollout",)


@pytest.mark.parametrize("methods, expected", [
    (["rollot"], "methods[0]: unknown method 'rollot'; did you mean 'rollout', 'grad-rollout'? (known: attention, rollout, relevance, grad-rollout, gradcam)"),
    (["attention", "rollout", "attention"], "methods[2]: 'attention' is listed more than once"),
    (["attention", 3], "methods[1]: expected a string, got 3 (put it in quotes to make it text)"),
    ("rollout", "methods: expected a list of method names or 'all', got 'rollout' (write [rollout] for one method)"),
    ([], "methods: the list is empty; name at least one method, or write all"),
    ({"a": 1}, "methods: expected a list of method names or 'all', got {'a': 1}"),
])
def test_bad_methods_are_located_manifest_errors(tmp_path, photo, methods, expected):
    assert _problems(write_manifest(tmp_path, [{"path": "a.png"}], methods=methods)) == [expected]


def test_bad_methods_in_the_manifest_through_the_cli(tmp_path, photo):
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], methods=["attention", "rolout"])
    result = _cli(manifest, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert str(manifest) in result.output
    assert "methods[1]: unknown method 'rolout'; did you mean 'rollout', 'grad-rollout'?" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# --methods on the command line
# --------------------------------------------------------------------------------------------


@pytest.fixture
def built_manifests(monkeypatch):
    """The manifests the real build is given (recorded on the way in, then built as usual)."""
    seen = []
    real = reportgen.builder.build

    def recording(manifest, options, *args, **kwargs):
        seen.append(manifest)
        return real(manifest, options, *args, **kwargs)

    monkeypatch.setattr(reportgen.builder, "build", recording)
    return seen


@pytest.mark.parametrize("option, expected", [
    ("rollout", ("rollout",)),
    ("rollout, attention", ("attention", "rollout")),  # kept in the registry's order
    ("all", tuple(METHODS)),
])
def test_methods_option_overrides_the_manifest(tmp_path, photo, built_manifests, option, expected):
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], methods=["attention"])
    result = _cli(manifest, tmp_path / "out", "--methods", option)
    assert result.exit_code == 0, result.output
    assert [m.methods for m in built_manifests] == [expected]


@pytest.mark.parametrize("option, expected", [
    ("rollot", "Invalid value for '--methods': unknown method 'rollot'; did you mean 'rollout', 'grad-rollout'?"),
    ("rollout,rollout", "Invalid value for '--methods': 'rollout' is listed more than once"),
    ("attention,", "Invalid value for '--methods': must not be empty"),
])
def test_bad_methods_option_is_a_usage_error(tmp_path, photo, option, expected):
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    result = _cli(manifest, tmp_path / "out", "--methods", option)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Overrides the settings refuse: exit 2 naming the option, before the manifest is even read
# --------------------------------------------------------------------------------------------

REFUSED_OPTIONS = [
    (["--input-size", "100000"], "'--input-size': 100000 is too large (at most 4096)"),
    (["--input-size", "0"], "'--input-size': expected a positive integer, got 0"),
    (["--discard-ratio", "1"], "'--discard-ratio': must satisfy 0 <= value < 1, got 1.0"),
    (["--rollout-start-layer", "0"], "'--rollout-start-layer': expected a positive integer, got 0"),
    (["--target-class", " "], "'--target-classes': expected a class index (0 or more), a class name, a list of them or top-k, got ' '"),
    (["--alpha", "0"], "'--alpha': must satisfy 0 < value <= 1, got 0.0"),
    (["--detector-threshold", "1.5"], "'--detector-threshold': must satisfy 0 < value <= 1, got 1.5"),
    (["--head-fusion", "avg"], "'--head-fusion': expected one of mean, max, min, got 'avg'"),
    (["--cmap", "infernoo"], "'--cmap': unknown matplotlib colour map 'infernoo'; did you mean 'inferno'"),
    (["--model", " "], "'--model': must not be empty"),
    (["--batch-size", "0"], "'--batch-size': expected a positive integer, got 0"),
    (["--jobs", "-1"], "'--jobs': expected a positive integer, got -1"),
    (["--device", "gpu"], "'--device': expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
]


@pytest.mark.parametrize("args, expected", REFUSED_OPTIONS)
def test_refused_override_exits_2_naming_the_option(tmp_path, photo, args, expected):
    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    result = _cli(manifest, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {expected}" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, expected", REFUSED_OPTIONS[:3])
def test_refused_override_is_reported_before_the_manifest_is_read(tmp_path, args, expected):
    result = _cli(tmp_path / "missing.yaml", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "not found" not in result.output


# --------------------------------------------------------------------------------------------
# Every rule exists once: the manifest, with_overrides and the command line say the same
# --------------------------------------------------------------------------------------------

SAME_RULE = [
    ("model", "input_size", 100000, "--input-size"),
    ("model", "input_size", -3, "--input-size"),
    ("model", "name", "m" * 300, "--model"),
    ("attention", "discard_ratio", 1.0, "--discard-ratio"),
    ("attention", "head_fusion", "avg", "--head-fusion"),
    ("attention", "rollout_start_layer", -2, "--rollout-start-layer"),
    ("attention", "target_classes", -1, "--target-classes"),
    ("detector", "threshold", 1.5, "--detector-threshold"),
    ("detector", "name", "", "--detector"),
    ("output", "alpha", 0.0, "--alpha"),
    ("output", "cmap", "infernoo", "--cmap"),
    ("output", "scale", "max", "--scale"),
    ("output", "scale_percentile", 50.0, "--scale-percentile"),
    ("output", "title", "t" * 501, "--title"),
]


@pytest.mark.parametrize("section, key, value, option", SAME_RULE)
def test_manifest_overrides_and_options_share_each_rule(tmp_path, photo, section, key, value, option):
    base = {"model": TINY_MODEL}.get(section, {})
    bad = write_manifest(_folder(tmp_path / "bad"), [{"path": "../a.png"}], **{section: {**base, key: value}})
    (problem,) = _problems(bad)

    good = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}]))
    with pytest.raises(SettingsError) as info:
        good.with_overrides(**{section: {key: value}})
    ((where, message),) = info.value.problems
    assert where == key
    assert problem == f"{section}.{key}: {message}"

    result = _cli(tmp_path / "manifest.yaml", tmp_path / "out", option, str(value))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': {message}" in " ".join(result.output.split())


def test_methods_rule_is_shared_by_the_manifest_and_with_overrides(tmp_path, photo):
    (problem,) = _problems(write_manifest(_folder(tmp_path / "m"), [{"path": "../a.png"}], methods=["rollot"]))
    good = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}]))
    with pytest.raises(SettingsError) as info:
        good.with_overrides(methods=["rollot"])
    assert problem == str(info.value)
    assert good.with_overrides(methods="all").methods == tuple(METHODS)


def test_with_overrides_validates_the_section_whole(tmp_path, photo):
    manifest = load_manifest(write_manifest(tmp_path, [{"path": "a.png"}], attention={"discard_ratio": 0.5}))
    changed = manifest.with_overrides(attention={"head_fusion": "max"}, detector={"name": "None"})
    assert (changed.attention.head_fusion, changed.attention.discard_ratio) == ("max", 0.5)
    assert changed.detector.name is None  # "none" means no detector, wherever it is written
    assert changed.model == manifest.model and changed.images == manifest.images


# --------------------------------------------------------------------------------------------
# BuildOptions
# --------------------------------------------------------------------------------------------


def test_build_options_are_checked_by_the_same_rules():
    with pytest.raises(ValueError) as info:
        BuildOptions(device="meta", batch_size=0, jobs=True)
    problems = SettingsError.of("options", info.value, BuildOptions).problems
    assert problems == [
        ("device", "expected auto, cpu, cuda, cuda:N or mps, got 'meta' "
                   "(the meta device holds no data, so there would be no attention to show)"),
        ("batch_size", "expected a positive integer, got 0"),
        ("jobs", "expected a positive integer, got true"),
    ]
    cache: dict = {}
    options = BuildOptions(device="cuda:1", model_cache=cache)
    assert options.model_cache is cache  # the caller's own dict, kept across builds
    assert reportgen.builder.BuildOptions is BuildOptions


def test_unknown_keys_name_every_allowed_key_including_methods(tmp_path, photo):
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"method": ["rollout"], "images": [{"path": "a.png"}]}), encoding="utf-8")
    assert _problems(path) == [
        "top level: unknown key 'method' (allowed: attention, detector, evaluate, images, methods, model, output, title)"
    ]


# --------------------------------------------------------------------------------------------
# The rollout start layer: a positive integer here, at most the model's depth once it is loaded
# --------------------------------------------------------------------------------------------


def test_rollout_start_layer_beyond_the_depth_is_one_line_naming_the_setting(tmp_path, photo):
    manifest = write_manifest(tmp_path, [{"path": "a.png"}], attention={"rollout_start_layer": 3})
    result = _cli(manifest, tmp_path / "out")
    assert result.exit_code == 1, result.output
    expected = ("reportgen: attention.rollout_start_layer (--rollout-start-layer) 3: greater than the depth of "
                "vit_tiny_patch16_224 (2 layers); use a layer from 1 to 2.\n")
    assert result.output == expected
    assert not (tmp_path / "out").exists()
    # The same from the command line; with no rollout to run, the setting does not matter.
    plain = write_manifest(_folder(tmp_path / "p"), [{"path": "../a.png"}])
    assert _cli(plain, tmp_path / "out", "--rollout-start-layer", "7").output == expected.replace(" 3:", " 7:")
    assert _cli(plain, tmp_path / "out", "--rollout-start-layer", "7", "--methods", "attention").exit_code == 0


def test_rollout_start_layer_beyond_the_depth_is_a_value_error_in_the_api(photo):
    from reportgen import Explainer

    explainer = Explainer(TINY_MODEL["name"], pretrained=False, input_size=32, options=TINY_MODEL["options"],
                          device="cpu", rollout_start_layer=3)
    with pytest.raises(ValueError, match=r"^attention.rollout_start_layer \(--rollout-start-layer\) 3: greater"):
        explainer.explain(photo)
    with pytest.raises(SettingsError, match="rollout_start_layer: expected a positive integer, got 0"):
        Explainer(TINY_MODEL["name"], rollout_start_layer=0)


def test_rollout_start_layer_is_in_the_cache_key_and_results(tmp_path, photo):
    import json

    manifest = write_manifest(tmp_path, [{"path": "a.png"}])
    out = tmp_path / "out"
    assert _cli(manifest, out).exit_code == 0
    assert json.loads((out / "results.json").read_text())["settings"]["rollout_start_layer"] == 1
    changed = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--rollout-start-layer", "2"])
    assert changed.exit_code == 0 and "unchanged" not in changed.output, changed.output
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["rollout_start_layer"] == 2
    page = (out / results["images"][0]["page"]).read_text()
    assert "multiplied through layers 2 to 2 (start layer 2, the layers before it the identity)" in page
    assert "Rollout before its start layer 2: the identity" in page and 'data-rollout-start="2"' in page
    again = CliRunner().invoke(main, ["build", str(manifest), "-o", str(out), "--rollout-start-layer", "2"])
    assert again.exit_code == 0 and "1 unchanged" in again.output, again.output
