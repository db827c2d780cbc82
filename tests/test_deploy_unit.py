"""The image deploy/Dockerfile builds holds every package the console script imports (no
Docker engine here: the build itself is not run, so its inputs are checked)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _packages() -> set[str]:
    """The top-level packages pyproject.toml installs."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in patterns}


def _cli_imports() -> set[str]:
    """The top-level packages twotower/cli.py imports at module level."""
    tree = ast.parse((ROOT / "twotower" / "cli.py").read_text())
    return {
        node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module is not None
    }


def test_the_image_copies_every_package_the_console_script_imports() -> None:
    copied = {
        line.split()[1].rstrip("/")
        for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    }
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    needed = _cli_imports() & _packages()
    assert needed >= {"twotower", "bench", "evaluation", "retriever"}  # what the check is about
    assert needed <= copied, f"not copied into the image: {sorted(needed - copied)}"
    assert not needed & ignored, f"left out of the build context: {sorted(needed & ignored)}"
