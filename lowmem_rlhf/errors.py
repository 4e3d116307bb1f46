"""User-facing errors: one line naming what is wrong and how to fix it."""


class UserError(Exception):
    """An error caused by user input. The CLI prints `error: <message>` and exits 2, never a traceback."""


class NoFit(UserError):
    """Nothing fits: the input was valid, the hardware is too small. Exit code 1 everywhere."""

    exit_code = 1
