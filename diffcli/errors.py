"""Error types that the CLI maps to exit codes (DESIGN.md "Errors").

`UserError`    bad input (recipe, option, path, file)            -> exit 2
`RunFailure`   a runtime failure (non-finite loss, out of disk)  -> exit 1
"""

from __future__ import annotations


class DiffcliError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class UserError(DiffcliError):
    """Bad input. The message names the field or file and the value."""

    exit_code = 2


class RunFailure(DiffcliError):
    """A run could not continue; the last good checkpoint is left intact."""

    exit_code = 1


class Interrupted(DiffcliError):
    """SIGINT (130) or SIGTERM (143) after a clean checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
