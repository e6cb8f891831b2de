"""The model layer's error type."""

from common.errors import UserError


class ModelError(UserError):
    """A model problem the user can fix: one line naming the model, id or path and what to do."""


def one_line(error: BaseException, limit: int = 240) -> str:
    """'Type: text' of an exception, squeezed onto one short line for quoting inside a ModelError."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
