"""taylor-kernels: compiled kernels for Taylor-framework attribution (IG, Hessians, jets)."""
from taylor_kernels import backends, ops  # noqa: F401

__version__ = "0.1.0"
