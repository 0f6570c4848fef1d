"""Reusable test kit: input factories, tolerance tables, verbose assert_close, NaN-poison and
the conformance check that every backend of every component must pass (also for plugins)."""

from .compare import CloseReport, assert_close, compare
from .conformance import ConformanceCase, check, matrix
from .inputs import make_inputs
from .pytest_plugin import conformance_tests
from .spec_check import spec_round_trip
from .tolerances import Tolerance, tolerance
from .training import assert_model_learns, train_on_pattern

__all__ = ["CloseReport", "ConformanceCase", "Tolerance", "assert_close", "check", "compare",
           "assert_model_learns", "conformance_tests", "make_inputs", "matrix", "spec_round_trip", "tolerance",
           "train_on_pattern"]
