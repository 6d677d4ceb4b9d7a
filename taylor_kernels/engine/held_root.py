"""A cached ``torch.fx`` trace's root, held without keeping the traced model alive.

The jet engine and the exact rule cache one trace per function (small LRUs). A trace's root
holds the modules its graph calls (the model, or its children) and the tensor constants FX
made; cached as it was, an entry kept a deleted model's weights alive until the LRU dropped
it (a notebook that loads one model after another held up to 16 of them through the jet
engine's cache and 8 through the exact rule's).
:class:`HeldRoot` keeps the root's modules by weak reference and the constants its graph
reads as they are, and builds a fresh root for each use. (A module the forward makes on every
call dies with the first root, so such a model is traced again on every call, as before it
was cached.) The
tensors FX made constants (what a closure captures: a tensor with a graph holds other models'
weights too) have the root as their only reference, so they are held strongly, and released
when the traced function dies (:meth:`HeldRoot.released_with`).
"""
from __future__ import annotations

import weakref

from torch import fx, nn


class HeldRoot:
    """``root``'s children (held weakly) and the constants ``graph`` reads off it with
    ``get_attr`` (plain attributes FX set: ``_tensor_constant*`` tensors, script objects, tree
    specs; it registers no parameter or buffer on a root it builds)."""

    def __init__(self, root: nn.Module, graph: fx.Graph):
        self._children = [(name, weakref.ref(m)) for name, m in root.named_children()]
        read = {n.target.split(".")[0] for n in graph.nodes if n.op == "get_attr"}
        self._constants = [(name, v) for name, v in vars(root).items() if name in read]

    def released_with(self, owner) -> weakref.ref:
        """A weak reference to ``owner`` (the traced function or model) that empties this
        root when ``owner`` dies (its entry then holds nothing until the LRU drops it).
        Raises ``TypeError`` for an owner that cannot be weakly referenced."""
        return weakref.ref(owner, lambda _: self._release())

    def _release(self) -> None:  # (a weakref callback: no container of the cache is touched)
        self._children, self._constants = [], []

    def root(self) -> nn.Module | None:
        """A root with the same attributes, or None when a weakly held module is gone."""
        root = nn.Module()
        for name, ref in self._children:
            m = ref()
            if m is None:
                return None
            root.add_module(name, m)
        for name, v in self._constants:
            object.__setattr__(root, name, v)
        return root
