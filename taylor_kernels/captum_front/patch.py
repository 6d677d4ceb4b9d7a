"""``patch()``: Captum's own path-integral classes run on taylor-kernels, in this process.

Libraries built on Captum (Inseq, ...) import Captum's classes by name when they load
(``from captum.attr import IntegratedGradients``) and create instances of them, so rebinding
names in ``captum.attr`` would never reach them. :func:`patch` therefore edits the classes
themselves: ``attribute`` and ``compute_convergence_delta`` of each class in
:data:`PATCHED_CLASSES` are replaced, in place, by functions that build the matching
:mod:`taylor_kernels.captum` object from the Captum instance (its ``forward_func``,
``layer``, ``device_ids``, ``multiplies_by_inputs``) and call it; so is
``LLMGradientAttribution.attribute`` (our one pass for layer IG, Captum's per-token loop on
our engine otherwise; Captum's result type). Every existing and future
instance, and every reference to the class, then runs on the path engine. The replacements
keep Captum's ``attribute.__wrapped__`` protocol (Captum's own ``NoiseTunnel`` over a patched
class works, batch by batch) and report our signature to ``inspect.signature``. Subclasses
that override one of the class's methods, instances with their own ``gradient_func``, and
calls with ``grad_kwargs`` that change the gradients (``create_graph=True``,
``grad_outputs``) keep running Captum's code (we could not honour their change).

:func:`unpatch` puts back exactly the objects that were in each class ``__dict__`` (or removes
what was not there); :func:`patched` is the context-manager form.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import threading
from typing import Callable

from taylor_kernels import captum_front
from taylor_kernels.captum_front._common import (customised, engine_takes_grad_kwargs,
                                                 for_captum)
from taylor_kernels.captum_front.llm import LLMGradientAttribution

PATCHED_CLASSES = ("IntegratedGradients", "LayerIntegratedGradients",
                   "NeuronIntegratedGradients", "GradientShap", "LayerGradientShap",
                   "LayerConductance", "NeuronConductance", "InternalInfluence")
METHODS = ("attribute", "compute_convergence_delta")
LLM_CLASS = "LLMGradientAttribution"  # only its attribute: our one pass, Captum's result type
_MISSING = object()
_LOCK = threading.Lock()
_saved: dict[tuple[type, str], object] = {}
# who wants the patch: an explicit patch() call, and the patched() blocks still open (any
# thread); it is undone when neither does (blocks may end in any order)
_wanted = {"explicit": False, "blocks": 0}


def _ours(inst, ours_cls):
    """Our object equivalent to Captum instance ``inst`` (built per call: cheap)."""
    kwargs = {}
    for name in list(inspect.signature(ours_cls.__init__).parameters)[1:]:
        if name == "multiply_by_inputs":
            kwargs[name] = inst.multiplies_by_inputs
        else:
            kwargs[name] = getattr(inst, name)
    with for_captum():  # Captum's constructor already warned about what it got
        return ours_cls(**kwargs)


def _replacement(cls, original, ours: Callable, like: Callable):
    """A function for a method of ``cls`` that runs ``ours(self, *args, **kwargs)`` (or
    ``original`` for customised instances, see
    :func:`~taylor_kernels.captum_front._common.customised`), reporting ``like``'s
    name, docstring and signature."""

    signature = inspect.signature(original)

    def run(self, *args, **kwargs):
        if customised(self, cls) or not _engine_takes(signature, self, args, kwargs):
            return original(self, *args, **kwargs)
        return ours(self, *args, **kwargs)

    def method(self, *args, **kwargs):
        return run(self, *args, **kwargs)

    functools.update_wrapper(method, like)
    # found where Captum's was by pickle (a plain reference to the method, or a partial of it,
    # failed: pickle looked it up under our class and found another object)
    method.__module__ = cls.__module__
    method.__qualname__ = f"{cls.__qualname__}.{original.__name__}"
    method.__wrapped__ = run  # Captum's NoiseTunnel calls attribute.__wrapped__(instance, ...)
    # with Captum's signature: code reads getfullargspec(attribute.__wrapped__) (Captum's own
    # tests choose whether to pass baselines by it)
    method.__signature__ = run.__signature__ = inspect.signature(like)
    method.__taylor_kernels__ = True
    return method


def _engine_takes(signature: inspect.Signature, inst, args: tuple, kwargs: dict) -> bool:
    """Whether the call's ``grad_kwargs`` (if the method has them) are ones the engine
    honours; a call that does not bind is ours (our method raises Captum's error)."""
    if "grad_kwargs" not in signature.parameters:
        return True
    try:
        bound = signature.bind(inst, *args, **kwargs)
    except TypeError:
        return True
    return engine_takes_grad_kwargs(bound.arguments.get("grad_kwargs"))


def _method_of(ours_cls, name: str) -> Callable:
    """``(captum_instance, *args, **kwargs) -> ours_cls(...).<name>(*args, **kwargs)``."""
    impl = getattr(ours_cls, name)
    return lambda inst, *args, **kwargs: impl(_ours(inst, ours_cls), *args, **kwargs)


def _llm_attribute(inst, *args, **kwargs):
    """``attribute`` of a Captum ``LLMGradientAttribution``: our class over the instance's
    method (with the model as its forward again: Captum's ``__init__`` swapped in a per-token
    wrapper) and tokenizer; the result as Captum's ``LLMAttributionResult``."""
    method = copy.copy(inst.attr_method)
    method.forward_func = inst.model
    res = LLMGradientAttribution(method, inst.tokenizer).attribute(*args, **kwargs)
    result_cls = importlib.import_module("captum.attr").LLMAttributionResult
    return result_cls(input_tokens=res.input_tokens, output_tokens=res.output_tokens,
                      seq_attr=res.seq_attr, token_attr=res.token_attr,
                      output_probs=res.output_probs, inp=res.inp)


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_saved)


def patch() -> None:
    """Make Captum's path-integral classes (:data:`PATCHED_CLASSES`) run on taylor-kernels,
    in place, for every instance and every reference; idempotent."""
    with _LOCK:
        _wanted["explicit"] = True
        _apply()


def _apply() -> None:
    """Patch the classes unless they are (caller holds ``_LOCK``)."""
    captum_attr = importlib.import_module("captum.attr")
    if _saved:
        return
    for cls_name in PATCHED_CLASSES:
        cls, ours_cls = getattr(captum_attr, cls_name), getattr(captum_front, cls_name)
        for name in METHODS:
            _saved[(cls, name)] = cls.__dict__.get(name, _MISSING)
            setattr(cls, name, _replacement(cls, getattr(cls, name), _method_of(ours_cls, name),
                                            getattr(ours_cls, name)))
    llm = getattr(captum_attr, LLM_CLASS, None)  # Captum >= 0.7
    if llm is not None:
        _saved[(llm, "attribute")] = llm.__dict__.get("attribute", _MISSING)
        setattr(llm, "attribute", _replacement(llm, llm.attribute, _llm_attribute,
                                               LLMGradientAttribution.attribute))


def unpatch() -> None:
    """Restore every patched class attribute to the exact object it was (idempotent); while
    a :func:`patched` block is open somewhere, the classes stay patched until it ends."""
    with _LOCK:
        _wanted["explicit"] = False
        if not _wanted["blocks"]:
            _restore()


def _restore() -> None:
    """Undo the patch (caller holds ``_LOCK``)."""
    for (cls, name), original in _saved.items():
        if original is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, original)
    _saved.clear()


@contextlib.contextmanager
def patched():
    """``with patched(): ...`` runs the block with Captum patched; the patch is undone when
    the last open block (in any thread, in any order) ends, unless :func:`patch` asked for it
    to stay."""
    with _LOCK:
        _wanted["blocks"] += 1
        try:
            _apply()
        except BaseException:
            _wanted["blocks"] -= 1
            raise
    try:
        yield
    finally:
        with _LOCK:
            _wanted["blocks"] -= 1
            if not _wanted["blocks"] and not _wanted["explicit"]:
                _restore()
