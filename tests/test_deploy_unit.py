"""The image deploy/Dockerfile builds holds every package the console script imports (no
Docker engine here: the build itself is not run, so its inputs are checked)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

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


DOCKER_TMPFS_OPTIONS = {"size", "mode", "uid", "gid", "nr_inodes", "nr_blocks", "mpol"}
"""What Docker accepts in a ``tmpfs:`` entry's options besides mount flags (ro, noexec, ...):
any other, such as ``huge``, makes it refuse to create the container."""


def test_compose_asks_docker_only_for_what_it_accepts() -> None:
    """A ``tmpfs:`` entry with ``huge=within_size`` kept the retriever's container from being
    created (and the simulator, which waits for it, from starting): ``docker compose config``
    does not check it, Docker does when it creates the container."""
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for entry in service.get("tmpfs") or []:
            _, _, options = entry.partition(":")
            keys = {option.split("=", 1)[0] for option in options.split(",") if "=" in option}
            assert keys <= DOCKER_TMPFS_OPTIONS, f"{name}: tmpfs options {keys - DOCKER_TMPFS_OPTIONS} are refused"
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith(("/", ".")):
                assert source in declared, f"{name}: volume {source} is not declared"
    parts = compose["volumes"]["retriever-parts"]["driver_opts"]
    assert parts["type"] == "tmpfs" and "huge=within_size" in parts["o"]
