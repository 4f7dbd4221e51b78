"""The early-exit mode, parsed in one place for settings, JSON bodies, form fields and KServe
parameters: 'auto' (the manifest's thresholds), 'off' (the whole network) or one threshold."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import PlainValidator, WithJsonSchema

from app.errors import excerpt

_THRESHOLD_SCHEMA = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
_FORMS = ("'auto', 'off' or a threshold in (0, 1] such as 0.9 (in JSON also "
          '{"threshold": 0.9})')


def parse_early_exit(value: Any) -> str | float:
    """'auto', 'off', a threshold t in (0, 1] (number or text) or {"threshold": t} -> 'auto',
    'off' or t; anything else is a ValueError that names the valid forms."""
    given = value
    if isinstance(value, Mapping):
        if set(value) != {"threshold"} or isinstance(value["threshold"], str):
            raise ValueError(f"early_exit must be {_FORMS}, got {excerpt(given)}")
        value = value["threshold"]
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"early_exit must be {_FORMS}, got {excerpt(given)}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"early_exit must be {_FORMS}, got {excerpt(given)}")
    return float(value)


EarlyExitMode = Annotated[
    str | float,
    PlainValidator(parse_early_exit),
    WithJsonSchema({
        "anyOf": [
            {"type": "string", "enum": ["auto", "off"]},
            _THRESHOLD_SCHEMA,
            {"type": "object", "properties": {"threshold": _THRESHOLD_SCHEMA},
             "required": ["threshold"], "additionalProperties": False},
        ],
        "description": "'auto' (the manifest's calibrated thresholds), 'off' (the whole network) "
                       "or a max-softmax threshold t, as a number or {\"threshold\": t}: exit at "
                       "the first block whose top probability reaches it",
    }),
]
