"""One exception type for every bad input, so callers can catch it without catching bugs."""


class MergeInputError(ValueError):
    """Raised when task vectors, models or merge parameters are unusable; the message names the field."""
