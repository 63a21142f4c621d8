"""The error of unusable input data (its own module: every reader raises it)."""


class DataError(ValueError):
    """Input data is unusable as a whole; the message names the field, file or line."""
