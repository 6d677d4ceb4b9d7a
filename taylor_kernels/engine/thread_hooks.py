"""Module hooks that act only in the thread that registered them.

The library's hooks sit on the caller's modules for the length of one call: a layer's output
replaced by path points, activations captured, each activation's derivative cached. A model
instance shared with other threads (a serving pool; an evaluation loop beside the call) would
run them in those threads' forwards too: their outputs replaced by our points, their
activations appended to our lists, their second derivatives lost. Wrapped by
:func:`this_thread`, a hook does nothing (returns None) in any other Python thread. It acts in
the autograd engine's own threads while they run a backward pass: ``torch.utils.checkpoint``
recomputes the forward there (on CUDA the backward runs in a device thread, not the
caller's), and the hook must act as it did in the forward; another thread's checkpointed
backward on CUDA runs in those threads as well and is not told apart. While
``torch.compile`` traces, the hook acts (the thread test cannot be traced; a compiled
forward is the calling thread's). Modules run in worker threads by the model itself
(``nn.DataParallel``, an ensemble on a thread pool) do not see the hooks: not supported.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch

# appended to "layer ... was not called" errors: the usual cause, and the one when the forward
# did call it (in another thread)
WORKER_THREADS = ("(is it part of what the forward runs? A forward given embeddings, e.g. "
                  "inputs_embeds=, never calls the embedding layer. The library's hooks also "
                  "act only in the calling thread: models that run layers in worker threads, "
                  "e.g. nn.DataParallel or a thread pool, are not supported)")


def this_thread(hook: Callable) -> Callable:
    """``hook`` (a forward or forward-pre hook) acting only in the calling thread (and in the
    autograd engine's threads during a backward pass, and while ``torch.compile`` traces);
    elsewhere it returns None, leaving the call as it was."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args, **kwargs):
        if torch.compiler.is_compiling() or threading.get_ident() == owner or (
                torch._C._current_autograd_node() is not None and _engine_thread()):
            return hook(*args, **kwargs)
        return None

    return scoped


def _engine_thread() -> bool:
    """True in a thread Python did not start (the autograd engine's device threads; Python
    sees them as dummy threads), False in user threads, whose backward passes run in
    themselves on the CPU."""
    return isinstance(threading.current_thread(), threading._DummyThread)


def hookable(model):
    """``model``, or for a ``torch.compile``d module its original module: graphs compiled
    before a layer's hook was added ignore it (dynamo does not guard on hooks by default), so
    layer IG after IG on a compiled model found the layer "not called"."""
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model
