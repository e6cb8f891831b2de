"""The engine and the tools around it: configuration, command line, run sequence, trainer,
evaluation, metrics, results, sweeps and reports.

Nothing is imported here so that ``import utils.config`` stays fast; import the modules
you need (``utils.engine``, ``utils.report``) where they are needed.
"""
