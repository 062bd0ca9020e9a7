"""The one error type for bad data: missing, corrupt, misaligned or mismatched files."""


class DataError(ValueError):
    """A data or score file that cannot be used; the message names the file and the fix."""
