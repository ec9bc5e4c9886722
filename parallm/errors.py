"""Errors a user can cause.

A `UserError` is caught by the CLI and printed as one line on stderr with exit status 2; anything
else escaping the CLI is a bug and keeps its traceback (exit status 1). The HTTP server answers
it with a 400 whose `param` is the field the message starts with ("max_tokens: ...").
"""

import re

_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


class UserError(ValueError):
    """Bad input from the user: the message names the field, the value and what would be valid."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        found = _FIELD.match(message)
        self.param = param if param is not None else (found.group(1) if found else None)
