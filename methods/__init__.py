"""Adaptation methods as plug-ins: each file in this package registers one method.

Files are discovered, so adding a method is adding one file (plus its test); nothing else
changes. ``python -m methods list`` shows what is registered.
"""

import importlib
import pkgutil

from methods.registry import Method, MethodError, Plan, Stage, get_method, method_names, methods, register

_NOT_METHODS = {"registry", "heads", "transductive", "__main__"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"methods.{_info.name}")

__all__ = ["Method", "MethodError", "Plan", "Stage", "get_method", "method_names", "methods", "register"]
