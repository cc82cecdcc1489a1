"""The exceptions every entry point handles: bad input (a file, an option, a config), printed
as a single line with exit status 1, as opposed to a bug, which keeps its traceback; and a
training that checkpointed and stopped early (exit status 3: resume later)."""


class InputError(ValueError):
    """Input that cannot be used; the message names it and says what was expected."""


class Stopped(Exception):
    """Training checkpointed and stopped before its last epoch (exit status 3: resume later)."""
