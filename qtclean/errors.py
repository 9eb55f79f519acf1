"""Errors the CLI turns into one line and an exit code.

Library code raises these with a message that says what went wrong, where, and how to fix it.
Anything else escaping to the CLI is a bug in qtclean.
"""


class QtcleanError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InputError(QtcleanError):
    """The user's data or arguments are wrong (exit 2)."""

    exit_code = 2


class RunError(QtcleanError):
    """A runtime failure not caused by the input: disk full, device missing, interrupted (exit 1)."""

    exit_code = 1
