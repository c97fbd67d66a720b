"""The one exception type the CLI turns into a one-line message and a non-zero exit, and how another
library's exception becomes part of such a line."""


class DietError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


class NotApplicable(DietError):
    """A method that cannot be applied to this model (its architecture, or the parameter target): a sweep
    reports it in that cell and goes on; any other error ends the sweep."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a
    one-line DietError quotes of another library's error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
