"""Rebuilds reuse unchanged images, never load a model when nothing changed, and distrust bad caches."""

import json

import pytest
from click.testing import CliRunner
from conftest import write_manifest, write_photo

import reportgen.compute
from reportgen.cache import STATUS_FILE
from reportgen.cli import main
from reportgen.model.runner import ModelRunner


@pytest.fixture
def counting(monkeypatch):
    """Counts model loads and images run through the model."""
    counts = {"loads": 0, "images": 0}
    real_load, real_run = reportgen.compute.load_model, ModelRunner.run

    def load(*args, **kwargs):
        counts["loads"] += 1
        return real_load(*args, **kwargs)

    def run(self, batch, *args, **kwargs):
        counts["images"] += batch.shape[0]
        return real_run(self, batch, *args, **kwargs)

    monkeypatch.setattr(reportgen.compute, "load_model", load)
    monkeypatch.setattr(ModelRunner, "run", run)
    return counts


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for i in range(3):
        write_photo(tmp_path / f"img{i}.png", (40 + 8 * i, 32), seed=i)
    images = [
        {"path": "img0.png", "id": "a", "title": "A", "caption": "first"},
        {"path": "img1.png", "id": "b", "kind": "multi",
         "objects": [{"label": "x", "box": [0, 0, 20, 20]}, {"label": "y", "box": [10, 5, 40, 30]}]},
        {"path": "img2.png", "id": "c"},
    ]
    return tmp_path, images


def _build(folder, images, *args, **sections):
    manifest = write_manifest(folder, images, **sections)
    return CliRunner().invoke(main, ["build", str(manifest), "-o", str(folder / "site"), "--quiet", *args])


def _snapshot(site):
    return {p.relative_to(site): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def test_unchanged_rebuild_is_byte_identical_and_loads_no_model(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    assert counting == {"loads": 1, "images": 3}
    first = _snapshot(folder / "site")
    assert _build(folder, images).exit_code == 0
    assert counting == {"loads": 1, "images": 3}  # nothing loaded or run the second time
    assert _snapshot(folder / "site") == first


def test_forced_rebuild_is_byte_identical(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    first = _snapshot(folder / "site")
    assert _build(folder, images, "--force").exit_code == 0
    assert counting == {"loads": 2, "images": 6}
    assert _snapshot(folder / "site") == first


def test_caption_change_recomputes_nothing(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    images[0]["caption"] = "an edited caption"
    images[2]["title"] = "A new title"
    assert _build(folder, images).exit_code == 0
    assert counting == {"loads": 1, "images": 3}
    assert "an edited caption" in (folder / "site" / "a.html").read_text()
    results = json.loads((folder / "site" / "results.json").read_text())
    assert results["images"][2]["title"] == "A new title"


def test_one_changed_image_is_the_only_one_recomputed(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    before = json.loads((folder / "site" / "results.json").read_text())["images"]
    write_photo(folder / "img2.png", (40, 32), seed=99)
    assert _build(folder, images).exit_code == 0
    assert counting == {"loads": 2, "images": 4}
    after = json.loads((folder / "site" / "results.json").read_text())["images"]
    assert after[:2] == before[:2] and after[2] != before[2]


def test_settings_change_recomputes_everything(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    assert _build(folder, images, "--cmap", "cividis").exit_code == 0
    assert counting["images"] == 6


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99, "entries": {}}), json.dumps([1, 2])])
def test_corrupt_or_foreign_cache_is_discarded_with_a_warning(project, counting, content):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    (folder / "site" / STATUS_FILE).write_text(content)
    result = _build(folder, images)
    assert result.exit_code == 0
    assert "ignoring the build cache" in result.output
    assert counting["images"] == 6


def test_missing_figure_means_recompute(project, counting):
    folder, images = project
    assert _build(folder, images).exit_code == 0
    (folder / "site" / "figures" / "b" / "maps.png").unlink()
    assert _build(folder, images).exit_code == 0
    assert counting["images"] == 4
    assert (folder / "site" / "figures" / "b" / "maps.png").is_file()


def test_failed_images_are_retried(project, counting):
    folder, images = project
    (folder / "img0.png").write_bytes(b"broken")
    assert _build(folder, images).exit_code == 3
    write_photo(folder / "img0.png", (40, 32), seed=0)
    assert _build(folder, images).exit_code == 0
    assert counting["images"] == 3  # 2 good the first time, then only the repaired one


def test_unchanged_rebuild_does_not_even_import_torch_or_matplotlib(project):
    import subprocess
    import sys

    folder, images = project
    assert _build(folder, images).exit_code == 0
    manifest = folder / "manifest.yaml"
    code = (
        "import sys\n"
        "from reportgen.cli import main\n"
        f"try:\n    main(['build', {str(manifest)!r}, '-o', {str(folder / 'site')!r}, '--quiet'])\n"
        "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print(sorted(m for m in ('torch', 'timm', 'transformers', 'matplotlib', 'seaborn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _modules_after_build(manifest, site) -> list[str]:
    """A build in a new process: the plotting libraries (and torch) it imported."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from reportgen.cli import main\n"
        f"try:\n    main(['build', {str(manifest)!r}, '-o', {str(site)!r}, '--quiet'])\n"
        "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "print(sorted(m for m in ('torch', 'matplotlib', 'seaborn', 'pandas', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().replace("'", '"'))


def test_a_build_whose_pages_need_no_new_index_figure_imports_no_plotting_library(project):
    """A moved box recomputes its image (the model runs, its figures and tables are made again)
    but leaves every layer's entropy as it was, so the index's figure is linked from the previous
    site: neither matplotlib nor seaborn (nor pandas, scipy) is imported. A changed photo changes
    that figure, which then imports them."""
    folder, images = project
    assert _build(folder, images).exit_code == 0
    site = folder / "site"
    before = json.loads((site / "results.json").read_text())["images"][1]
    images[1]["objects"][0]["box"] = [2, 2, 22, 22]
    manifest = write_manifest(folder, images)
    assert _modules_after_build(manifest, site) == ["torch"]
    after = json.loads((site / "results.json").read_text())["images"][1]
    assert after["objects"]["objects"][0]["box"] == [2, 2, 22, 22]  # recomputed ...
    assert after["layer_entropy"] == before["layer_entropy"]  # ... with the same figure on the index
    assert "rgb(" in (site / after["page"]).read_text()  # its similarity tables coloured all the same
    write_photo(folder / "img2.png", (56, 32), seed=7)
    assert {"matplotlib", "seaborn", "torch"} <= set(_modules_after_build(manifest, site))


def test_the_status_file_holds_the_records_of_results_json_in_one_canonical_json_text(project):
    folder, images = project
    images[0]["title"] = "Kätzchen <b>"  # text beyond ASCII is written as it is, in UTF-8
    assert _build(folder, images).exit_code == 0
    text = (folder / "site" / STATUS_FILE).read_text(encoding="utf-8")
    status = json.loads(text)
    assert text == json.dumps(status, sort_keys=True, ensure_ascii=False) + "\n"
    results = json.loads((folder / "site" / "results.json").read_text(encoding="utf-8"))
    assert [entry["record"] for _slug, entry in sorted(status["entries"].items())] == sorted(
        results["images"], key=lambda record: record["slug"])


def test_the_collector_skips_the_libraries_during_a_build_and_is_restored_after(project, monkeypatch):
    import gc

    folder, images = project
    frozen_while_running = []
    real_run = ModelRunner.run

    def run(self, *args, **kwargs):
        frozen_while_running.append(gc.get_freeze_count())
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run", run)
    assert gc.get_freeze_count() == 0
    assert _build(folder, images).exit_code == 0
    assert frozen_while_running and min(frozen_while_running) > 1000  # torch's objects among them
    assert gc.get_freeze_count() == 0
    # A process that froze objects of its own keeps those frozen and no others (objects freed
    # meanwhile leave the count).
    gc.freeze()
    try:
        mine = gc.get_freeze_count()
        frozen_while_running.clear()
        assert _build(folder, images, "--force").exit_code == 0
        assert frozen_while_running and max(frozen_while_running) <= mine
        assert 0 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
    # A build that stops on an error unfreezes as well.

    def fail(self, *args, **kwargs):
        frozen_while_running.append(gc.get_freeze_count())
        raise RuntimeError("the model failed")

    frozen_while_running.clear()
    monkeypatch.setattr(ModelRunner, "run", fail)
    failed = _build(folder, images, "--force")
    assert failed.exit_code != 0 or "the model failed" in failed.output
    assert frozen_while_running and min(frozen_while_running) > 1000
    assert gc.get_freeze_count() == 0
