"""Harness errors: each names the field (or resource) at fault and how to fix it."""


class BenchError(Exception):
    """A problem with a run's configuration, data or weights that the user can fix."""
