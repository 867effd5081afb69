"""The one exception type for user mistakes (bad paths, bad files, bad options).

The CLI turns a ``UserError`` into a one-line ``error: ...`` message on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the file or field and what is wrong."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), to quote in a
    one-line :class:`UserError`."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
