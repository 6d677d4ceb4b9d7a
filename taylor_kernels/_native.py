"""Loads the compiled extension ``taylor_kernels._C`` tolerantly, once, without touching CUDA.

Importing ``_C`` registers the native ops (``torch.ops.taylor_kernels.*``: C++ CPU kernels, and
CUDA kernels when it was built with CUDA). If it is missing the package still works on the
reference and Triton backends; one warning says so and how to build it.
"""
from __future__ import annotations

import importlib
import warnings

BUILD_HINT = ("build it with: pip install torch==<your torch> && "
              "pip install --no-build-isolation -e .")

try:
    import torch  # noqa: F401  (the extension links against libtorch)

    _C = importlib.import_module("taylor_kernels._C")  # registers torch.ops.taylor_kernels.*
    LOAD_ERROR: str | None = None
except ImportError as exc:  # the package must import without the extension
    _C = None
    LOAD_ERROR = str(exc)
    warnings.warn(f"taylor_kernels: compiled extension not available ({exc}); the 'cpp' and "
                  f"'cuda' backends are disabled, 'reference' and 'triton' still run; "
                  f"{BUILD_HINT}", RuntimeWarning, stacklevel=2)


def has_cpp() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels (no CUDA call is made)."""
    return _C is not None and bool(_C.built_with_cuda())
