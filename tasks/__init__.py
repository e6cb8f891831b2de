"""Floor 3: kinds of task as plug-ins (single-label, multi-label, image-caption).

Registration is explicit: a new kind of task is one file in this package, its test, and one entry in
``PLUGINS`` (its place there is its place in help texts and error messages). Engine, report, predict and
export ask the task named in a run's results.json (``get_task(name)``).
"""

import importlib

from tasks.registry import Evaluation, Task, get_task, head_tasks, register, task_names, tasks

PLUGINS = ("single_label", "multilabel", "captions")
for _name in PLUGINS:
    importlib.import_module(f"tasks.{_name}")

__all__ = ["Evaluation", "Task", "get_task", "head_tasks", "register", "task_names", "tasks"]
