"""hff-train flags derived from the config models: a flag's type, choices, default and help come
from the pydantic field it sets, so a setting is declared once (in its model) and only named here.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def _without_none(annotation: Any) -> Any:
    """`float | None` -> float; other annotations unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_flags(group: argparse._ActionsContainer, model: type[BaseModel], flags: dict[str, str],
              default_text: str | None = None) -> None:
    """One flag per field: `flags` maps a field of `model` to its flag (`{"gamma": "--gamma"}`).

    A flag left out is absent from the parsed arguments (see `given`), so the model's own default
    applies; the help shows that default, or `default_text` where the value comes from elsewhere
    (a preset). A list field takes comma-separated values.
    """
    for name, flag in flags.items():
        field = model.model_fields[name]
        kind = _without_none(field.annotation)
        options: dict[str, Any] = {"dest": name_of(flag), "default": argparse.SUPPRESS}
        if get_origin(kind) is Literal:
            options["choices"] = list(get_args(kind))
        elif get_origin(kind) is list:
            options["metavar"] = "K,K"  # parsed in `given`, so a bad value is a one-line error
        elif kind in (int, float, str):
            options["type"] = kind
            options["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        else:
            raise TypeError(f"{model.__name__}.{name}: no flag for a {kind} field")
        shown = default_text if default_text is not None else field.default
        text = field.description or ""
        if shown is not None:
            text += f" (default: {shown})"
        group.add_argument(flag, help=text.strip(), **options)


def name_of(flag: str) -> str:
    """The argparse destination of a flag: --ff-score-blocks -> ff_score_blocks."""
    return flag.removeprefix("--").replace("-", "_")


def given(args: argparse.Namespace, model: type[BaseModel], flags: dict[str, str]) -> dict[str, Any]:
    """{field: value} for the flags given on the command line (list fields split on commas);
    the model validates the values. ValueError names the flag of a malformed list."""
    values: dict[str, Any] = {}
    for name, flag in flags.items():
        if not hasattr(args, name_of(flag)):
            continue
        value = getattr(args, name_of(flag))
        if get_origin(_without_none(model.model_fields[name].annotation)) is list:
            try:
                item = get_args(_without_none(model.model_fields[name].annotation))[0]
                value = [item(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"{flag} {value!r}: expected e.g. 2,3") from None
        values[name] = value
    return values
