"""The error raised for LoRA settings or files a user can fix."""

from common.errors import UserError


class LoRAError(UserError):
    """A LoRA mistake a user can fix: bad settings, a model without the asked projections, a bad adapter file."""
