"""Loads the compiled extension ``taylor_kernels._C`` tolerantly, once, without touching CUDA.

Importing ``_C`` registers the native ops (``torch.ops.taylor_kernels.*``: C++ CPU kernels, and
CUDA kernels when it was built with CUDA). The build records the torch it compiled against in
``taylor_kernels/_build_info.py``; under any other torch ``_C`` is not loaded at all (it links
against libtorch's C++ ABI, which changes between releases). If it is missing or stale the
package still works on the reference and Triton backends; one warning says so and how to fix it.
"""
from __future__ import annotations

import importlib
import warnings

import torch  # the extension links against libtorch: torch is loaded first

BUILD_HINT = ("rebuild it against the installed torch: pip install --no-build-isolation "
              "--no-deps --force-reinstall --no-cache-dir taylor-kernels (from a source "
              "checkout: pip install --no-build-isolation -e .)")


def torch_mismatch(built: str | None, running: str) -> str | None:
    """Why an extension compiled against torch ``built`` must not load under ``running``.

    None when the versions are equal (the whole string, local label included: ``+cpu`` and
    CUDA builds of one release are different binaries) or when the build recorded none.
    """
    if built is None or built == running:
        return None
    return f"it was built against torch {built} but torch {running} is installed"


def _recorded_torch() -> str | None:
    """The torch version the installed ``_C`` was compiled against (None: not recorded)."""
    try:
        return importlib.import_module("taylor_kernels._build_info").TORCH_VERSION
    except ImportError:
        return None


def _load():
    """(module or None, reason it is unavailable or None)."""
    mismatch = torch_mismatch(_recorded_torch(), str(torch.__version__))
    if mismatch is not None:
        return None, mismatch
    try:
        return importlib.import_module("taylor_kernels._C"), None  # registers the ops
    except ImportError as exc:  # the package must import without the extension
        return None, str(exc)


_C, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"taylor_kernels: compiled extension not available ({LOAD_ERROR}); the 'cpp' "
                  f"and 'cuda' backends are disabled, 'reference' and 'triton' still run; "
                  f"{BUILD_HINT}", RuntimeWarning, stacklevel=2)


def has_cpp() -> bool:
    """True when the C++ CPU kernels are loaded."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels (no CUDA call is made)."""
    return _C is not None and bool(_C.built_with_cuda())
