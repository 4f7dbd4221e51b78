"""One readable line from pydantic's error list, for CLI messages and 422 answers alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError


def describe_errors(errors: ValidationError | Iterable[Mapping[str, Any]], root: str = "input",
                    name: Callable[[str], str] = str, limit: int = 5) -> str:
    """'body.top_k: Input should be greater than or equal to 1; ...'.

    `root` names an error without a location (the whole document); `name` maps a dotted
    location to what the user typed (the settings map MAX_BATCH_SIZE to HFF_MAX_BATCH_SIZE).
    """
    if isinstance(errors, ValidationError):
        errors = errors.errors()
    errors = list(errors)
    parts = []
    for e in errors[:limit]:
        where = ".".join(str(p) for p in e.get("loc", ())) or root
        # a ValueError raised in a validator carries the message itself; pydantic's prefix is noise
        parts.append(f"{name(where)}: {str(e.get('msg', 'invalid')).removeprefix('Value error, ')}")
    if len(errors) > limit:
        parts.append(f"and {len(errors) - limit} more")
    return "; ".join(parts)
