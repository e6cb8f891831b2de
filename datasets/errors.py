"""The data layer's error type."""

from common.errors import UserError


class DatasetError(UserError):
    """A data problem the user can fix: one line naming the file or folder and what to do."""
