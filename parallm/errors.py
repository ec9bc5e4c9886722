"""Errors a user can cause.

A `UserError` is caught by the CLI and printed as one line on stderr with exit status 2; anything
else escaping the CLI is a bug and keeps its traceback (exit status 1).
"""


class UserError(ValueError):
    """Bad input from the user: the message names the field, the value and what would be valid."""
