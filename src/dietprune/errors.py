"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DietError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


class NotApplicable(DietError):
    """A method that cannot be applied to this model (its architecture, or the parameter target): a sweep
    reports it in that cell and goes on; any other error ends the sweep."""
