"""The one exception type the CLI turns into a single line on stderr and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names what is wrong and how to fix it."""
