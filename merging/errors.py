"""The one exception type the library raises for problems a user can fix."""

import difflib


class MergeError(ValueError):
    """A problem with the user's input, said in one line that names it.

    Raised before heavy work wherever the problem can be seen early; the CLI prints
    the message alone and exits with code 2.
    """


class FolderNotEmpty(MergeError):
    """The output folder holds files and overwriting was not allowed. The message names no
    control: the command line adds its flag, the app its checkbox."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or nothing."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
