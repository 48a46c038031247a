"""Copy the source folders into DEST laid out as the installed ``qkdlab`` package.

Used by ``make importlint``: import-linter discovers modules by walking the package
directory, which an editable install with ``package-dir`` mapping does not have.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage(dest: Path) -> None:
    """Recreate ``dest/qkdlab`` from the ``package-dir`` table of pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    # parents before children: "qkdlab" first, then "qkdlab.drivers", ...
    for package in sorted(package_dir, key=lambda name: name.count(".")):
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / package_dir[package], target, ignore=ignore, dirs_exist_ok=True)


if __name__ == "__main__":
    stage(Path(sys.argv[1]))
