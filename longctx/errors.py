"""The one exception type for user mistakes: the CLI prints its message as a single line and exits non-zero."""


class UserError(ValueError):
    """Bad input from the user (a path, an option, a file). The message names the problem and the fix."""
