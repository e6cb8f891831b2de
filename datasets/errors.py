"""The data layer's error type."""

from utils.errors import UserError


class DatasetError(UserError):
    """A data problem the user can fix: one line naming the file or folder and what to do."""
