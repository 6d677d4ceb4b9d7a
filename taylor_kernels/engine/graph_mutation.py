"""In-place ops in a traced forward whose changed tensor a later node reads again.

Interpreters that run a traced graph on other values than tensors (the exact path's pairs,
the jet's Taylor coefficients) give every node a new value: an in-place op then changes
nothing that a later node reads (``F.relu(h, inplace=True)`` as a statement, ``h.mul_(2)``,
then ``h`` used), and the numbers come out silently wrong. In-place ops whose input nothing
else reads later (``x = self.relu(x)`` with ``inplace=True``) are exact as run. (FX records
``h += 1`` as ``h = h + 1``: an alias of the old ``h`` read later is caught only by the
interpreters' checks of the traced outputs against the model's, which miss a change that
vanishes at both ends of an exact path: :func:`_augmented_then_read` flags the pattern it
leaves, a chain of arithmetic ending in a node nothing reads.)
"""
from __future__ import annotations

import operator

from torch import fx, nn


def _in_place(node: fx.Node, root: nn.Module) -> bool:
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return (node.kwargs.get("inplace") is True
            or node.op in ("call_method", "call_function") and name.endswith("_")
            and not name.endswith("__")  # h.relu_(), torch.relu_(h), F.relu_(h)
            or node.op == "call_module" and getattr(root.get_submodule(node.target),
                                                    "inplace", False) is True)


# ops whose result may share its input's memory: an in-place op on the result changes the
# input too (h[:, :4].clamp_(min=0), then h read)
_VIEW_METHODS = frozenset({"view", "view_as", "reshape", "narrow", "select", "transpose", "t",
                           "permute", "unsqueeze", "squeeze", "expand", "expand_as",
                           "unflatten", "flatten", "as_strided", "diagonal", "unfold"})


def _viewed(node: fx.Node) -> list[fx.Node]:
    """``node`` and the nodes whose memory it may share (back through views and indexing)."""
    chain = [node]
    while (node.op == "call_function" and node.target is operator.getitem
           or node.op == "call_method" and node.target in _VIEW_METHODS) \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        chain.append(node)
    return chain


_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.truediv,
                         operator.floordiv, operator.mod, operator.pow, operator.matmul,
                         operator.and_, operator.or_, operator.xor, operator.lshift,
                         operator.rshift})


def _arithmetic(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _ARITHMETIC and bool(node.args) \
        and isinstance(node.args[0], fx.Node)


def _augmented_then_read(n: fx.Node, order: dict) -> bool:
    """``n`` ends a chain of arithmetic that nothing reads (``h += t; h *= 2`` traced as
    ``h2 = h + t; h3 = h2 * 2``, ``h3`` unused) and the chain's first operand is read after
    the chain by another node: had the chain run in place (``+=``), that read sees the new
    value (an alias ``r = h`` read after ``h += bump``: 4x off on an exact path whose bump
    vanished at both ends). A dead ``h = h + t`` beside a read of ``h`` looks the same and
    is flagged too (harmless: the caller falls back)."""
    if n.users or not _arithmetic(n):
        return False
    cur = n
    while True:
        prev = cur.args[0]
        if any(u is not cur and order[u] > order[cur] for u in prev.users):
            return True
        if len(prev.users) != 1 or not _arithmetic(prev):
            return False
        cur = prev


def mutated_then_read(graph: fx.Graph, root: nn.Module) -> fx.Node | None:
    """The first in-place node of ``graph`` (traced from ``root``) whose changed tensor (or a
    tensor it is a view of) a later node reads again, else None; an augmented assignment
    (``+=``) FX recorded as a new value counts (:func:`_augmented_then_read`)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if _augmented_then_read(n, order):
            return n
        if not _in_place(n, root) or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        chain = _viewed(n.args[0])
        if any(order[u] > order[n] for m in chain for u in m.users
               if u is not n and u not in chain):
            return n
    return None
