"""The one exception type the library raises for problems a user can fix."""


class MergeError(ValueError):
    """A problem with the user's input, said in one line that names it.

    Raised before heavy work wherever the problem can be seen early; the CLI prints
    the message alone and exits with code 2.
    """
