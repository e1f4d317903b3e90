"""The runner's one error type (kept free of torch so that the command line imports it at once)."""


class UsageError(Exception):
    """A problem the user can fix; the CLI prints it on one line and exits with status 2."""
