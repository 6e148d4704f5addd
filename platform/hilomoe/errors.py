"""The one exception type the command line turns into a single clear sentence (no stack trace)."""


class HilomoeError(Exception):
    """Bad input or an impossible request; the message is meant for a person, as is."""
