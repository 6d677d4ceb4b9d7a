"""Nested forward mode through a forward that writes its buffers.

``torch.func`` transforms refuse an in-place change of a tensor made outside them ("would
mutate a captured Tensor"): a forward that counts its calls or updates a cache in a buffer
(``self.calls += 1``) failed every jet that fell back to nested forward mode (``jet``,
``mixed_partials``, ``taylor_decomposition``, ``interactions`` on an untraceable model). There
the transform is run again with each buffer of the modules ``f`` reaches
(:func:`~taylor_kernels.engine.guards.modules_of`) replaced, inside it, by a copy: the
forward writes the copies, and the caller's buffers are put back as they were.
"""
from __future__ import annotations

import contextlib

import torch

from taylor_kernels.engine.guards import modules_of
from taylor_kernels.numerics import nested_jvp_coefficients

CAPTURED_WRITE = "would mutate a captured Tensor"


def nested_jvp_writing_copies(fn, f, coeffs, order: int):
    """:func:`~taylor_kernels.numerics.nested_jvp_coefficients` of ``fn`` (arguments as
    there), run again on copies of the buffers of the modules ``f`` reaches when ``fn``
    writes a tensor made outside the transform; ``RuntimeError`` naming the cause when that
    tensor is not such a buffer (a global, a closure's tensor)."""
    try:
        return nested_jvp_coefficients(fn, coeffs, order)
    except RuntimeError as exc:
        if CAPTURED_WRITE not in str(exc):
            raise
        first = exc
    modules = modules_of(f)

    def on_copies(*args):
        with buffers_copied(modules):
            return fn(*args)

    try:
        return nested_jvp_coefficients(on_copies, coeffs, order)
    except RuntimeError as exc:
        if CAPTURED_WRITE not in str(exc):
            raise
        raise RuntimeError(
            "the forward writes in place a tensor made outside it that is not a buffer of "
            "the model's modules (a global or a closure's tensor, a plain tensor attribute): "
            "nested forward mode (torch.func.jvp), which this jet fell back to, cannot run "
            "it; register it as a buffer (module.register_buffer) or do not write it "
            "during attribution") from first


@contextlib.contextmanager
def buffers_copied(modules):
    """Each buffer of ``modules`` and their submodules replaced by a copy (one per tensor:
    shared buffers stay shared) inside the block; the originals put back on exit."""
    held = [(m, name, b) for root in modules for m in root.modules()
            for name, b in m._buffers.items() if isinstance(b, torch.Tensor)]
    copies: dict[int, torch.Tensor] = {}
    try:
        for m, name, b in held:
            if id(b) not in copies:
                copies[id(b)] = b.clone()
            m._buffers[name] = copies[id(b)]
        yield
    finally:
        for m, name, b in held:
            m._buffers[name] = b
