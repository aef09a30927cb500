"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class LGFormerError(Exception):
    """A user-facing error: bad input, missing file, wrong checkpoint. The message names what and why."""
