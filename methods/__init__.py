"""Adaptation methods as plug-ins: each module named below registers one method.

Registration is explicit: adding a method is one file in this package, its test, and one line
here. Shared building blocks (heads, the transductive prior) live in modules that register
nothing. ``python -m methods list`` shows what is registered.
"""

from methods import (  # noqa: F401  (each import registers its method)
    adapter,
    bitfit,
    clap,
    clip_adapter,
    cocoop,
    coop,
    dora,
    full,
    ivlp,
    knn,
    linear,
    logreg,
    lora,
    lp_ft,
    lp_pp,
    prototype,
    simpleshot,
    svd,
    taskres,
    tip_adapter,
    tpt,
    vpt,
    zeroshot,
)
from methods.registry import Method, MethodError, Plan, Stage, get_method, method_names, methods, register

__all__ = ["Method", "MethodError", "Plan", "Stage", "get_method", "method_names", "methods", "register"]
