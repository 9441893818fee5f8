"""Merge methods, one module per family; importing this package registers them all."""

from . import interpolation, other, selective, task_arithmetic  # noqa: F401  (registration)
from .registry import METHODS, Method, Parameter, TensorInputs, describe_methods, get_method

__all__ = ["METHODS", "Method", "Parameter", "TensorInputs", "describe_methods", "get_method"]
