"""Every registered op of the ``taylor_kernels`` namespace has what STYLE.md asks for: a
reference with the same name, a public dispatching function in ``taylor_kernels.ops``, a fake
kernel, an autograd formula, tests and a benchmark case."""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import taylor_kernels
import taylor_kernels.reference as reference
from taylor_kernels import backends

ROOT = Path(__file__).resolve().parents[2]


def _load_kernel_modules() -> None:
    """Import the Triton modules too (they register ``*_triton`` ops) when Triton is there."""
    if backends.available()["triton"]:
        import taylor_kernels.triton as tri
        for mod in pkgutil.iter_modules(tri.__path__):
            importlib.import_module(f"taylor_kernels.triton.{mod.name}")


def registered_ops() -> list[str]:
    _load_kernel_modules()
    return sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("taylor_kernels::")})


def base_name(op: str) -> str:
    return op.removesuffix("_triton")


def reference_functions() -> dict[str, object]:
    found = {}
    for mod in pkgutil.iter_modules(reference.__path__):
        m = importlib.import_module(f"taylor_kernels.reference.{mod.name}")
        found.update({k: v for k, v in vars(m).items() if callable(v)})
    return found


def _sources(*dirs: str) -> str:
    return "\n".join(p.read_text() for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_namespace_is_not_empty():
    ops = registered_ops()
    assert {"path_points", "path_accumulate"} <= {base_name(o) for o in ops}, ops


@pytest.mark.parametrize("op", registered_ops())
def test_op_has_reference_public_function_fake_and_autograd(op):
    base = base_name(op)
    assert base in reference_functions(), f"no reference taylor_kernels.reference.*.{base}"
    assert callable(getattr(taylor_kernels.ops, base, None)), f"no taylor_kernels.ops.{base}"
    qualname = f"taylor_kernels::{op}"
    entry = torch._library.simple_registry.singleton.find(qualname)
    assert entry.fake_impl.kernel is not None, f"{qualname} has no fake kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"), \
        f"{qualname} has no autograd formula"


@pytest.mark.parametrize("op", sorted({base_name(o) for o in registered_ops()}))
def test_op_is_tested_and_benchmarked(op):
    assert f"{op}(" in _sources("tests/ops"), f"no test in tests/ops calls {op}"
    assert op in _sources("taylor_kernels/benchmarks", "bench"), f"no benchmark case for {op}"
