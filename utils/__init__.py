"""Floor 6, the applications: command line, sweeps, estimates, reports, prediction and export.

They call the engine (``engine/``); nothing below imports them. Nothing is imported here so that
``python -m utils.report`` stays fast.
"""
