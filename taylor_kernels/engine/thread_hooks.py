"""Module hooks that act only in the thread that registered them.

The library's hooks sit on the caller's modules for the length of one call: a layer's output
replaced by path points, activations captured, each activation's derivative cached. A model
instance shared with other threads (a serving pool; an evaluation loop beside the call) would
run them in those threads' forwards too: their outputs replaced by our points, their
activations appended to our lists, their second derivatives lost. Wrapped by
:func:`this_thread`, a hook does nothing (returns None) in any other thread, except inside a
backward pass: ``torch.utils.checkpoint`` recomputes the forward there, on CUDA in the autograd
engine's device thread, and the hook must act as it did in the forward. Hence modules run by
``nn.DataParallel`` (replicas in worker threads) do not see the hooks: not supported.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import torch


def this_thread(hook: Callable) -> Callable:
    """``hook`` (a forward or forward-pre hook) acting only in the calling thread (and in
    backward passes' recomputed forwards); elsewhere it returns None, leaving the call as
    it was."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def scoped(*args, **kwargs):
        if threading.get_ident() == owner or torch._C._current_autograd_node() is not None:
            return hook(*args, **kwargs)
        return None

    return scoped
