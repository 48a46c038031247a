"""One import name, and every source folder shipped under it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    package_dir: dict[str, str] = SETUPTOOLS["package-dir"]
    expected = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            parts = [p for p in relative.parts if p]
            expected.add(".".join([package, *parts]))
    assert expected == set(SETUPTOOLS["packages"]), (
        "pyproject [tool.setuptools] packages must list every folder with an __init__.py"
    )


def test_top_level_folders_are_not_importable_on_their_own(tmp_path: Path) -> None:
    script = (
        "import importlib, qkdlab.drivers, qkdlab.mock_instruments, qkdlab.protocol\n"
        "for name in ('drivers', 'experiments', 'calibration', 'mock_instruments', "
        "'protocol', 'gui'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable as a top-level package')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_direction_import_breaks_a_contract(tmp_path: Path) -> None:
    """The import-linter contracts are live: a driver importing a mock fails them."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    stage = subprocess.run([sys.executable, str(ROOT / "tools" / "stage_package.py"),
                            str(tmp_path)], check=True)
    assert stage.returncode == 0
    clean = subprocess.run([str(lint_imports), "--config", str(ROOT / "pyproject.toml"),
                            "--no-cache"], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                           capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stdout
    roles = tmp_path / "qkdlab" / "drivers" / "roles.py"
    roles.write_text(roles.read_text() + "\nimport qkdlab.mock_instruments.launcher\n")
    broken = subprocess.run([str(lint_imports), "--config", str(ROOT / "pyproject.toml"),
                             "--no-cache"], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True, check=False)
    assert broken.returncode != 0
    assert "drivers import no experiment, calibration, GUI or mock code BROKEN" in broken.stdout
