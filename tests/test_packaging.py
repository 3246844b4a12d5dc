"""A plain (non-editable) install finds the templates: checked from a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_templates_and_finds_them(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("reportgen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for template in sorted(p.name for p in (ROOT / "reportgen" / "site" / "templates").iterdir()):
        assert f"reportgen/site/templates/{template}" in names
    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    # Run from an empty folder with only the installed copy importable: no source tree to fall back on.
    out = subprocess.run(
        [sys.executable, "-c", "import reportgen.site.pages as s; print(s.template_dir()); s.environment().get_template('image.html')"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
    )
    assert Path(out.stdout.strip()) == target / "reportgen" / "site" / "templates"
