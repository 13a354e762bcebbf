"""One exception type for every mistake a user can make, so the CLI can print one sentence and exit."""

import time


class RadError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""


class TimeLimitReached(Exception):
    """A long job stopped cleanly at its time limit with everything done so far saved; the same command continues
    it. Not an error: the CLI says so and exits with status 75 (EX_TEMPFAIL, "try again")."""


def check_deadline(deadline: float | None, what: str) -> None:
    """Raise TimeLimitReached when `deadline` (a time.monotonic() value) has passed, before `what` starts."""
    if deadline is not None and time.monotonic() > deadline:
        raise TimeLimitReached(f"Stopped at the time limit before {what}; everything finished so far is saved: run "
                               "the same command again to continue.")
