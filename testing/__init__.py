"""Reusable test kit: input factories, tolerance tables, verbose assert_close, NaN-poison and
the conformance check that every backend of every component must pass (also for plugins)."""

from .compare import CloseReport, assert_close, compare
from .conformance import ConformanceCase, check, matrix
from .inputs import make_inputs
from .tolerances import Tolerance, tolerance

__all__ = ["CloseReport", "ConformanceCase", "Tolerance", "assert_close", "check", "compare",
           "make_inputs", "matrix", "tolerance"]
