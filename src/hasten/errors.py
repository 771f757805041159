"""The one exception type hasten raises for bad input; the CLI turns it into one line and exit code 2."""


class HastenError(ValueError):
    """Bad input or a file that does not fit: the message is a complete sentence for the user."""
