"""Registered primitives, dispatched to the backend chosen by :mod:`taylor_kernels.backends`."""
from taylor_kernels.ops.hessian import ih_accumulate
from taylor_kernels.ops.jet import (jet_mul, jet_unary, polarization_rule, polarize,
                                    polarize_contract)
from taylor_kernels.ops.path import path_accumulate, path_points

__all__ = ["path_points", "path_accumulate", "jet_unary", "jet_mul", "polarize",
           "polarization_rule", "polarize_contract", "ih_accumulate"]
