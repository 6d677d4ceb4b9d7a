"""taylor-kernels: compiled kernels for Taylor-framework attribution (IG, Hessians, jets).

Public API (see README): ``integrated_gradients``, ``backends``, ``ops``.
"""
from taylor_kernels import backends, ops
from taylor_kernels.attr import AttributionResult, integrated_gradients

__version__ = "0.1.0"
__all__ = ["AttributionResult", "backends", "integrated_gradients", "ops"]
