"""Policy variants: ``name[field=value,…]`` runs a policy with model or trainer settings changed.

``two_tower_streaming[loss=bce,logq_correction=none]`` is the deployed two-tower with a
pointwise loss and no sampling-bias correction; any field of :class:`~twotower.config.ModelConfig`
or :class:`~twotower.config.TrainerConfig` may be set, validated as the configuration file
would be. Variants run beside the plain policies in one replay, so each option's effect is
measured under the same protocol, on the same log, in the same run.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ValidationError

_SPEC = re.compile(r"^(?P<name>[a-z0-9_]+)(?:\[(?P<overrides>[^\[\]]*)\])?$")


def parse_policy(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name[a=1,b=x]`` into ``("name", {"a": "1", "b": "x"})``.

    Raises:
        ValueError: a malformed spec.
    """
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ValueError(f"bad policy {spec!r}: expected name or name[field=value,...]")
    overrides: dict[str, str] = {}
    body = match.group("overrides")
    if body is not None:
        for part in body.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ValueError(f"bad override {part!r} in {spec!r}: expected field=value")
            overrides[key.strip()] = value.strip()
    return match.group("name"), overrides


def split_policies(text: str) -> list[str]:
    """Split a ``--policies`` value on the commas outside brackets."""
    out, depth, current = [], 0, []
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    out.append("".join(current).strip())
    return [p for p in out if p]


def with_overrides(model_cfg: Any, trainer_cfg: Any, overrides: dict[str, str]) -> tuple[Any, Any]:
    """The two configuration sections with ``overrides`` applied, each to the section that has the field.

    Raises:
        ValueError: an unknown field or a value the field does not accept.
    """
    sections: dict[str, dict[str, Any]] = {"model": {}, "trainer": {}}
    for key, value in overrides.items():
        if key in type(model_cfg).model_fields:
            sections["model"][key] = value
        elif key in type(trainer_cfg).model_fields:
            sections["trainer"][key] = value
        else:
            raise ValueError(f"unknown setting {key!r}: not a field of the model or trainer configuration")
    return _validated(model_cfg, sections["model"]), _validated(trainer_cfg, sections["trainer"])


def _validated(cfg: BaseModel, changes: dict[str, Any]) -> Any:
    if not changes:
        return cfg
    try:
        return type(cfg).model_validate({**cfg.model_dump(), **changes})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid setting: {problems}") from None
