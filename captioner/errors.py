"""The one exception type for user mistakes (bad paths, bad files, bad options).

The CLI turns a ``UserError`` into a one-line ``error: ...`` message on stderr and a non-zero
exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names the file or field and what is wrong."""
