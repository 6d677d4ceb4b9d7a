"""Reading and replacing layer activations, for one layer or a list, tensors or tuples.

A layer's *activation* is its output (or, with ``of_input``, its positional inputs) as a tuple
of tensors: a tensor output is a 1-tuple, a tuple output keeps its length. For a list of
layers the activations are concatenated into one flat tuple; :class:`Layers` remembers how
many tensors each layer contributes, so attributions can be regrouped per layer.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from taylor_kernels.engine import guards, memory
from taylor_kernels.engine.thread_hooks import WORKER_THREADS, hookable, this_thread


class UnusedLayerOutput(ValueError):
    """The attributed layer's activation (at the call a method reads) does not reach the
    model's output: no gradient flows from it, so there is nothing to attribute."""


def unused_layer_error(modules: Sequence[torch.nn.Module], of_input: bool = False,
                       calls: Sequence[int] | None = None,
                       last_call: bool = False) -> UnusedLayerOutput:
    """:class:`UnusedLayerOutput` naming ``modules``; ``last_call``: the method reads each
    layer's last call (``calls`` per forward), said so where one runs more than once."""
    names = ", ".join(type(m).__name__ for m in modules)
    what = "input" if of_input else "output"
    several = last_call and any(c > 1 for c in calls or ())
    which = f"its last call's {what} (of {max(calls)} calls per forward)" if several else \
        f"its {what}" if len(modules) == 1 else f"their {what}s"
    return UnusedLayerOutput(
        f"layer {names}: {which} does not reach the model output (no gradient flows from "
        f"it: the layer's output is discarded or feeds nothing the output uses, or is "
        "detached or computed under torch.no_grad), so there is nothing to attribute; "
        "attribute a layer on the path to the output"
        + (" (the gradient is taken at the layer's last call, as Captum's)" if several
           else ""))


@contextlib.contextmanager
def layer_reaches_output(modules: Sequence[torch.nn.Module], of_input: bool = False,
                         calls: Sequence[int] | None = None, last_call: bool = False):
    """The engine's "no gradient path" ``ValueError`` from the block, whose path runs in the
    layers' activations, as :func:`unused_layer_error` (the model may well depend on its
    inputs: what does not reach its output is the layers' activation)."""
    try:
        yield
    except ValueError as exc:
        if str(exc) != guards.NO_GRADIENT_PATH:
            raise
        raise unused_layer_error(modules, of_input, calls, last_call) from exc


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the activations are captured."""


class Layers:
    """One module or a list of modules whose activations are read or replaced together."""

    def __init__(self, layers, of_input: bool = False):
        self.modules = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not self.modules or not all(isinstance(m, torch.nn.Module) for m in self.modules):
            raise TypeError(f"layer must be a torch.nn.Module or a list of them, got "
                            f"{layers!r}")
        self.of_input = of_input
        self.counts: list[int] = []  # activation tensors per layer
        self.calls: list[int] | None = None  # calls per layer in one forward (first capture)

    @property
    def key(self) -> tuple:
        """Which activations these are (the modules, and inputs or outputs): with a model it
        names a wrapper's chunk choices (:func:`~taylor_kernels.engine.chunking.owner_for`)."""
        return (*map(id, self.modules), self.of_input)

    def _register(self, hook_for: Callable[[int], Callable]) -> list:
        if self.of_input:
            return [m.register_forward_pre_hook(this_thread(hook_for(i)))
                    for i, m in enumerate(self.modules)]
        return [m.register_forward_hook(this_thread(hook_for(i))) for i, m in enumerate(self.modules)]

    @contextlib.contextmanager
    def hooked(self, hook_for: Callable[[int], Callable]):
        """Hooks ``hook_for(i)`` on layer ``i`` (pre-hooks for inputs) for the block."""
        handles = self._register(hook_for)
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _as_tuple(self, i: int, value) -> tuple[torch.Tensor, ...]:
        vals = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
            what = "inputs" if self.of_input else "output"
            got = type(value).__name__ if len(vals) == 1 else \
                f"{type(value).__name__} of ({', '.join(type(v).__name__ for v in vals)})"
            raise ValueError(f"layer {type(self.modules[i]).__name__} {what} must be a tensor "
                             f"or a tuple of tensors, got {got}")
        return vals

    def capture(self, model: Callable, args: tuple, *, grad: bool = False,
                stop: bool = True, output: bool = False):
        """Run ``model(*args)`` and return every layer's activation, flattened into one tuple
        (detached unless ``grad``); with ``output``, ``(activations, model output)`` from a
        whole forward. A layer called several times gives its last call's activation (as
        Captum). The first capture runs the whole forward and counts the calls; later ones,
        with ``stop`` and without ``output``, end the pass once every layer had that many
        calls."""
        stop = stop and not output
        out = None
        seen: dict[int, tuple] = {}
        count = [0] * len(self.modules)

        def hook_for(i):
            def grab(module, inp, out=None):
                vals = self._as_tuple(i, inp if self.of_input else out)
                count[i] += 1
                last = stop and self.calls is not None and all(
                    c >= n for c, n in zip(count, self.calls))
                # a copy: an in-place op later in the forward (ReLU(inplace=True)) would
                # otherwise change what was read; none runs after the pass stops here
                seen[i] = tuple(v if last and grad else v.clone() if grad else
                                v.detach().clone() for v in vals)
                if last:
                    if grad:  # the forward ends on these: not saved, but held
                        memory.count_unsaved([t for v in seen.values() for t in v])
                    raise _Stop
            return grab

        guards.check_model(model, args)  # refuse before a forward can touch buffers
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self.hooked(hook_for), guards.preserved_buffers(model):
            try:
                out = hookable(model)(*args)
            except _Stop:
                pass
        missing = [type(self.modules[i]).__name__ for i in range(len(self.modules))
                   if i not in seen]
        if missing:
            raise ValueError(f"layer(s) {missing} were not called by the model's forward "
                             + WORKER_THREADS)
        self.counts = [len(seen[i]) for i in range(len(self.modules))]
        if self.calls is None:
            self.calls = count
        flat = tuple(t for i in range(len(self.modules)) for t in seen[i])
        flat = flat if grad else tuple(t.detach() for t in flat)
        return (flat, out) if output else flat

    def reaching_output(self, last_call: bool = False):
        """:func:`layer_reaches_output` for these layers (``last_call``: the method reads
        each one's last call)."""
        return layer_reaches_output(self.modules, self.of_input, self.calls, last_call)

    def unused_error(self, last_call: bool = False) -> UnusedLayerOutput:
        """:func:`unused_layer_error` for these layers."""
        return unused_layer_error(self.modules, self.of_input, self.calls, last_call)

    def _slices(self) -> list[slice]:
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        return [slice(s, s + c) for s, c in zip(starts, self.counts)]

    def group(self, flat: Sequence[torch.Tensor]) -> list:
        """A flat tuple (one entry per activation tensor) regrouped per layer, Captum's way:
        a tensor for a layer with one activation tensor, else a tuple."""
        return [flat[s][0] if s.stop - s.start == 1 else tuple(flat[s]) for s in self._slices()]

    @contextlib.contextmanager
    def edited(self, edit: Callable[[int, torch.Tensor], torch.Tensor], last_call: bool = False):
        """Within the block, activation tensor ``k`` (flat numbering) is replaced by
        ``edit(k, activation)`` at every call of its layer (only at its last call, as counted
        by the first :meth:`capture`, with ``last_call``); yields the set of layers called."""
        done: set[int] = set()
        slices = self._slices()
        count = [0] * len(self.modules)

        def hook_for(i):
            def replace(module, inp, out=None):
                refuse_recomputed_layer(module)
                done.add(i)
                count[i] += 1
                if last_call and self.calls is not None and count[i] != self.calls[i]:
                    return None
                vals = self._as_tuple(i, inp if self.of_input else out)
                new = tuple(edit(k, v) for k, v in zip(range(slices[i].start, slices[i].stop),
                                                       vals))
                if self.of_input:
                    return new
                return new if isinstance(out, tuple) else new[0]
            return replace

        with self.hooked(hook_for):
            try:
                yield done
            finally:
                done.clear()

    def replaced_forward(self, model: Callable) -> Callable:
        """``g(*acts, *inputs, *args) = model(*inputs, *args)`` with the layers' activations
        (flat numbering, ``len(acts) == sum(counts)``) replaced by copies of ``acts``."""
        n = sum(self.counts)

        def through_layers(*all_args):
            acts, rest = all_args[:n], all_args[n:]
            # copies: acts are views of the engine's points, and a model may scale what a
            # layer gives it in place (CTRL: inputs_embeds *= sqrt(d)), which autograd refuses
            with self.edited(lambda k, v: acts[k].clone()) as done:
                out = hookable(model)(*rest)
                if len(done) != len(self.modules):
                    raise ValueError("not every layer was called by the model's forward")
            return out

        through_layers.cost_owner = self.modules[0]  # chunk choice cached per layer, not closure
        return through_layers


def refuse_recomputed_layer(layer: torch.nn.Module) -> None:
    """``ValueError`` when ``layer`` runs inside ``torch.utils.checkpoint(...,
    use_reentrant=False)`` (its saved-tensor hooks are on top): the backward recomputes the
    block without the replacement this call makes of the layer's activation (its hook is
    gone by then), so the gradients were another function's, silently (layer IG 12-15% off,
    as Captum's)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    if hooks and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", ""):
        raise ValueError(
            f"layer {type(layer).__name__} runs inside torch.utils.checkpoint "
            "(use_reentrant=False): the backward recomputes it without the activation this "
            "method puts in its place, which would give another function's gradients; "
            "attribute the model without activation checkpointing (it saves memory for "
            "training only; max_memory bounds this call)")


def select_neuron(acts: tuple[torch.Tensor, ...], selector) -> torch.Tensor:
    """One value per row ``[N]`` from a layer's activations: ``selector`` an int or a tuple
    of ints and slices indexing the activation past the batch dimension (slices are summed
    over), or a callable ``selector(activation)`` (``activation`` a tuple when the layer has
    several tensors) returning ``[N]`` or ``[N, 1]``, or, as Captum allows, one scalar summed
    over the batch (``lambda x: x[:, 2:].sum()``): it then runs on each row alone."""
    if callable(selector):
        out = selector(acts if len(acts) > 1 else acts[0])
        N = acts[0].shape[0]
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (N, 1):
            out = out[:, 0]
        elif isinstance(out, torch.Tensor) and out.dim() == 0:
            out = torch.stack([selector(tuple(a[i:i + 1] for a in acts) if len(acts) > 1
                                        else acts[0][i:i + 1]).reshape(()) for i in range(N)])
    else:
        if len(acts) > 1:
            raise ValueError(f"the layer has {len(acts)} activation tensors; pass a callable "
                             "neuron_selector to choose a neuron among them")
        index = selector if isinstance(selector, tuple) else (selector,)
        if not all(isinstance(i, (int, slice)) for i in index):
            raise TypeError(f"neuron_selector holds indices (an int, or a tuple of ints and "
                            f"slices) or is a callable, got {selector!r}")
        if len(index) > acts[0].dim() - 1:
            raise ValueError(f"neuron_selector {selector!r} has more indices than the layer "
                             f"activation of shape {tuple(acts[0].shape)} past the batch")
        out = acts[0][(slice(None),) + index]
        if any(isinstance(i, slice) for i in index):
            out = out.reshape(out.shape[0], -1).sum(1)
    if not isinstance(out, torch.Tensor) or out.dim() != 1 or \
            out.shape[0] != acts[0].shape[0]:
        raise ValueError(f"neuron_selector must pick one value per example ([N]), got shape "
                         f"{tuple(getattr(out, 'shape', ()))}; index every activation "
                         "dimension or use slices")
    return out
