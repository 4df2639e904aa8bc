"""One exception type for every problem with user input, so the CLI can print one line and exit non-zero."""


class VitqError(Exception):
    """Bad input or an unsupported model feature; the message names the input and what was expected."""
