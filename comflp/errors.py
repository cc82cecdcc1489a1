"""The one kind of error an entry point prints as a single line and exits 1 on: bad input
(a file, an option, a config), as opposed to a bug, which keeps its traceback."""


class InputError(ValueError):
    """Input that cannot be used; the message names it and says what was expected."""
