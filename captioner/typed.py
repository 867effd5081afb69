"""Typed config nodes: a dataclass built from a mapping, every key and value checked on the way.

``from_dict(TrainerConfig, node, "trainer")`` turns a Hydra/OmegaConf node (or a plain dict) into
the dataclass. An unknown key, or a value of the wrong type, is a one-line :class:`UserError`
naming the full key (``trainer.max_epochs: expected an integer, got 'ten'``); range checks live in
each dataclass's ``__post_init__``. Nested dataclass fields are parsed recursively with their own
prefix, so a message always names the key the user typed. Torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from captioner.errors import UserError

T = TypeVar("T")

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _plain(node: Any) -> Any:
    """An OmegaConf node as plain containers; anything else unchanged."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a mapping"
    return _TYPE_WORDS.get(hint, getattr(hint, "__name__", str(hint)))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` as ``hint`` (int, float, bool, str, list[X], dict, X | None, a dataclass);
    an OmegaConf node is read as the plain list or dict it holds."""
    value = _plain(value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        if len(choices) == 1:  # X | None: X's own message names the problem
            return _coerce(value, choices[0], where)
        for arg in choices:
            try:
                return _coerce(value, arg, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where}: expected {_describe(hint)}, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected {_describe(hint)}, got {value!r}")
        return dict(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise UserError(f"{where}: expected {_describe(hint)}, got {value!r}")


def key(where: str, name: str) -> str:
    """The full key of option ``name`` under prefix ``where`` ('' at the top level)."""
    return f"{where}.{name}" if where else name


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from mapping ``data``; ``where`` is the key prefix in messages.

    Missing keys take the dataclass defaults. A ``UserError`` raised by ``__post_init__`` names
    its full key (``data.batch_size must be >= 1``) or else gets ``where`` in front.
    """
    data = _plain(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{where or 'config'}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(
            f"{key(where, unknown[0])}: unknown option (known: {', '.join(sorted(known))})"
        )
    values = {name: _coerce(value, hints[name], key(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except UserError as exc:
        # a check that names the field alone (DecodeConfig's, which the CLI and the server share)
        # gets the node's key in front: ``trainer.val_decode: beam_size must be >= 1``
        if where and not str(exc).startswith(where):
            raise UserError(f"{where}: {exc}") from exc
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where or 'config'}: {exc}") from exc


__all__ = ["from_dict", "key"]
