"""Checks of command-line values that every stage's commands share."""

from __future__ import annotations

import math

import typer


def finite(value: float | None) -> float | None:
    """A typer callback: refuse ``inf`` and ``nan`` (which typer reads as floats, and a ``min=``
    bound lets through) with a usage error; ``None`` (an option not given) passes."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value
