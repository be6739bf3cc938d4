"""The one exception type for bad user input; every CLI turns it into `error: ...` and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one sentence."""
