"""One exception type for a user's mistake, so the CLI prints one line instead of a traceback."""


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a layer). The message names the bad value.

    A ValueError, so code that checks values generally can catch it too."""
