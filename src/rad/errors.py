"""One exception type for every mistake a user can make, so the CLI can print one sentence and exit."""


class RadError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""
