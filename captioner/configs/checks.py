"""The checks every config runs in ``__post_init__``: each raises one ``UserError`` line that
names the key (``data.batch_size must be >= 1, got 0``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from captioner.errors import UserError
from captioner.typed import key


def at_least(obj: Any, where: str, **minimum: int) -> None:
    for name, low in minimum.items():
        value = getattr(obj, name)
        if value < low:
            raise UserError(f"{key(where, name)} must be >= {low}, got {value}")


def one_of(obj: Any, where: str, **choices: Sequence[str]) -> None:
    for name, allowed in choices.items():
        if getattr(obj, name) not in allowed:
            raise UserError(
                f"{key(where, name)} must be one of {', '.join(allowed)}, "
                f"got {getattr(obj, name)!r}"
            )
