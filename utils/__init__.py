"""Shared run machinery: configuration, errors, metrics, results, training, reports.

Only light modules are imported here so that ``import utils`` stays fast; import the
heavier ones (``utils.trainer``, ``utils.report``) where they are needed.
"""

from common.errors import UserError
from utils.config import RunConfig, is_finished, run_dir

__all__ = ["RunConfig", "UserError", "is_finished", "run_dir"]
