"""The one exception type for user errors (bad input files, keys, values)."""


class GnnstError(ValueError):
    """A problem with the user's input: a file, key or value that cannot be used.

    The message names the file, key and value at fault. The command line prints it as one line
    and exits with status 2, without a traceback.
    """
