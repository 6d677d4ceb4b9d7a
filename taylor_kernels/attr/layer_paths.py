"""Layer attributions as path integrals on the path engine.

* :func:`multi_layer_integrated_gradients`: IG in the space of one or several layers'
  activations (tensors or tuples), the path running in activation space.
* :func:`internal_influence`, :func:`layer_conductance`, :func:`layer_gradient_shap`: the
  path runs in *input* space, ``p(t) = b + t (x - b)``, and the gradient is taken with
  respect to the layer activation ``a``:

  - internal influence ``II_j = sum_s w_s  dF/da_j (p(t_s))``;
  - conductance ``C_j = sum_s dF/da_j (p(t_s)) (a_j(p(t_{s+1})) - a_j(p(t_s)))`` over the
    ``S + 1`` nodes of the rule (Captum's Riemann-Stieltjes sum of ``int dF/da da``);
  - layer GradientSHAP ``(a_j(x~) - a_j(b~)) dF/da_j (p(t~))`` at sampled
    ``(x~, b~, t~)`` (or without the factor).

How the engine computes sums of *layer* gradients along *input-space* paths
(:class:`LayerSpace`): the engine integrates over coordinates ``e`` shaped like the activation,
from ``0`` to ``1``, with the node *indices* ``s = 0, 1, ...`` as its nodes (so ``e = s``
exactly, in float64). The model maps a point ``e`` to the input point ``p(t_s)`` of each row
(``t`` from a per-row node table passed as a forward argument), runs the network there, and
adds ``(e - stop(e)) * D`` to the layer's activation: zero in value, and the engine's gradient
with respect to ``e`` is ``dF/da * D``. With the engine's factor ``1 - 0 = 1`` and weights
``w_s`` its sum is exactly the sums above, chunked to the memory budget like every path.
With ``attribute_to_layer_input`` the layer's input tensors are not edited: ``dF/da`` is
their total derivative (every use of them counts, also outside the layer, as Captum's gradient
in the tensors it saves), mapped to ``e`` by a custom backward (:class:`_InputGradient`).
"""
from __future__ import annotations

import numbers

import torch

from taylor_kernels import backends
from taylor_kernels.attr.arguments import forward_args, inputs_tuple
from taylor_kernels.attr.integrated_gradients import AttributionResult, check_rule_args
from taylor_kernels.attr.layer import _baseline_inputs, without_exact_rule
from taylor_kernels.attr.layer_budget import check_held, layer_ig_bytes, layer_space_bytes
from taylor_kernels.attr.layer_capture import Layers
from taylor_kernels.attr.layer_ends import integrate_from_ends, layer_ends
from taylor_kernels.attr.unscaled import unscaled_integrated_gradients
from taylor_kernels.engine import chunking, memory, path_engine, quadrature
from taylor_kernels.engine.derivative import flex_runs_eager_on_cpu
from taylor_kernels.engine.problem import make_problem
from taylor_kernels.engine.row_args import select_rows
from taylor_kernels.engine.thread_hooks import hookable
from taylor_kernels.models.outputs import model_output
from taylor_kernels.user_warnings import warn

DIRECTIONS = ("ones", "given", "next")


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def multi_layer_integrated_gradients(model, layers, inputs, baselines=None, target=None, *,
                                     attribute_to_layer_input: bool = False,
                                     additional_forward_args=None,
                                     multiply_by_inputs: bool = True,
                                     **ig_kwargs) -> AttributionResult:
    """Layer IG for one layer or a list, each activation a tensor or a tuple of tensors.

    ``LIG_j = (a_j(x) - a_j(b)) int_0^1 dF/da_j (a(b) + t (a(x) - a(b))) dt`` where ``a`` is
    all the layers' activations (outputs, or positional inputs with
    ``attribute_to_layer_input``) replaced together in one forward. Inputs may be token ids.

    Args:
        layers: a module or a list of modules; baselines: input-space (None = zeros, numbers,
            tensors broadcastable to the inputs; a tuple for tuple inputs).
        multiply_by_inputs: False drops the ``a_j(x) - a_j(b)`` factor.
        ig_kwargs: as :func:`integrated_gradients` (``steps``, ``rule``, ``max_memory``, ...).
    Returns:
        :class:`AttributionResult` whose ``attributions`` is a list with one entry per layer:
        a tensor shaped like its activation, or a tuple for a layer with several tensors;
        ``gap [B] = sum(attr) - (F(x) - F(b))`` with ``F`` the model's own outputs at the
        inputs and baselines (Captum's convergence delta, also where the network bypasses the
        layers).
    """
    tup, fargs = inputs_tuple(inputs), forward_args(additional_forward_args)
    spec = Layers(layers, attribute_to_layer_input)
    bls = _baseline_inputs(baselines, tup)
    check_rule_args(ig_kwargs.get("rule", "gausslegendre"), ig_kwargs.get("tol"))
    ig_kwargs = without_exact_rule(ig_kwargs)
    check_held(lambda args: spec.capture(model, args), tup, bls, fargs,
               ig_kwargs.get("max_memory"), layer_ig_bytes, chunk_size=ig_kwargs.get("chunk_size"))
    if multiply_by_inputs:  # two small forwards, as Captum's
        ends = layer_ends(lambda args: spec.capture(model, args, output=True), tup, bls,
                          fargs, memory.check_chunk_size(ig_kwargs.get("chunk_size")))
        acts_x, acts_b = ends.acts_x, ends.acts_b
        with spec.reaching_output():
            res = integrate_from_ends(spec.replaced_forward(model), acts_x, acts_b, ends,
                                      target, tup + fargs, **ig_kwargs)
    else:
        acts_b = spec.capture(model, bls + fargs)
        acts_x = spec.capture(model, tup + fargs)
        with spec.reaching_output():
            res = unscaled_integrated_gradients(spec.replaced_forward(model), acts_x, acts_b,
                                                target, tup + fargs, **ig_kwargs)
    _warn_unreached_layers(spec, res.attributions, acts_x, acts_b)
    res.attributions = spec.group(res.attributions)
    return res


def _warn_unreached_layers(spec: Layers, flat: tuple[torch.Tensor, ...], acts_x: tuple,
                           acts_b: tuple) -> None:
    """Warn for each of several layers whose attributions are all exactly zero although its
    activations move along the path (``acts_x != acts_b``): they reach the output only
    through another listed layer, whose activations the path replaces (Captum's
    ``LayerIntegratedGradients`` raises autograd's "appears to not have been used in the
    graph" there; the zeros are the consistent answer, but seldom what was meant)."""
    if len(spec.modules) < 2:
        return
    for i, part in enumerate(spec._slices()):
        moves = any(not torch.equal(a, b) for a, b in zip(acts_x[part], acts_b[part]))
        if moves and all(not bool(t.any()) for t in flat[part]):
            warn(f"the attributions of layer {i} ({type(spec.modules[i]).__name__}) "
                 "are all zero: its output reaches the model's output only through "
                 "another of the listed layers, whose output the path replaces; "
                 "attribute the layers in separate calls", RuntimeWarning)


class LayerSpace:
    """A model in path-index coordinates ``e`` shaped like a layer's activations (see the
    module docstring). Call signature, as the engine calls models::

        (*e, table, *x, *b, *d, *rest)

    ``e`` one tensor per activation tensor; ``table [R|1, S+1]`` float64 nodes ``t`` per row;
    ``x``, ``b`` the input-space ends of each row's path; ``d`` the directions ``D`` (only for
    ``direction="given"``); ``rest`` the model's own additional forward args. ``direction``:
    ``"ones"`` (``D = 1``), ``"given"`` or ``"next"`` (``D = a(p(t_{s+1})) - a(p(t_s))``).
    """

    def __init__(self, model, spec: Layers, n_inputs: int, direction: str):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.model, self.spec, self.n_in, self.direction = model, spec, n_inputs, direction

    @property
    def cost_owner(self):
        """One owner of chunk choices per model, layers and direction (this wrapper is made
        per call: each call probed again)."""
        return chunking.owner_for(self.model, "layer_space", self.direction,
                                  *self.spec.key) or self

    def __call__(self, *args):
        n_act, n_in = sum(self.spec.counts), self.n_in
        es, table = args[:n_act], args[n_act]
        xs = args[n_act + 1:n_act + 1 + n_in]
        bs = args[n_act + 1 + n_in:n_act + 1 + 2 * n_in]
        rest = args[n_act + 1 + 2 * n_in:]
        ds = None
        if self.direction == "given":
            ds, rest = rest[:n_act], rest[n_act:]
        idx = es[0].detach().reshape(es[0].shape[0], -1)[:, 0].round().long()
        idx = idx.clamp(0, table.shape[1] - 2)  # the engine's endpoint probes sit at e = 0, 1

        def point(j):
            t = table.gather(1, j.unsqueeze(1).to(table.device)).squeeze(1)
            return tuple(b + t.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1)) * (x - b)
                         for x, b in zip(xs, bs))

        nxt = None
        if self.direction == "next":
            nxt = self.spec.capture(self.model, point(idx + 1) + rest)

        def direction(k, v):
            if self.direction == "ones":
                return None
            return ds[k] if ds is not None else nxt[k] - v.detach()

        if self.spec.of_input:  # the total derivative in the layer's input tensors (below):
            # the points require grad, so that uses of those tensors before the layer's call
            # are recorded too (with frozen weights or the model's input as the layer's, they
            # were not: 2.0 off Captum)
            pts = tuple(p.detach().requires_grad_() if p.is_floating_point() else p
                        for p in point(idx))
            return self._through_inputs(es, pts + rest, direction)

        def edit(k, v):
            delta = (es[k] - es[k].detach()).to(v.dtype)
            d = direction(k, v)
            return v + (delta if d is None else delta * d)

        with self.spec.edited(edit, last_call=True):  # Captum: the gradient at the last call
            return hookable(self.model)(*point(idx), *rest)

    def _through_inputs(self, es, args, direction):
        """The model's output at ``args``, whose gradient in ``e_k`` is ``dF/dv_k * D_k`` with
        ``v_k`` the layer's input tensors at its last call and ``dF/dv_k`` their *total*
        derivative, every use of those tensors counted (before and after the layer, as
        Captum's gradient in the saved inputs; an edit at the layer would see only the
        layer's own use)."""
        taken: dict[int, torch.Tensor] = {}

        def take(k, v):
            if not v.requires_grad and v.is_floating_point():
                v.requires_grad_()  # a leaf: later uses enter the graph (as Captum's)
            taken[k] = v
            return v.clone()  # the layer gets a copy (as Captum's): in place, it changes that

        with self.spec.edited(take, last_call=True):
            out = model_output(hookable(self.model)(*args))
        vs = [taken[k] for k in range(len(es))]
        dirs = [direction(k, v) for k, v in enumerate(vs)]
        return _InputGradient.apply(out, vs, dirs, *es)


class _InputGradient(torch.autograd.Function):
    """``y = _InputGradient.apply(out, vs, dirs, *es)``: the value of ``out``; backward
    ``grad_e_k = (d <grad, out> / d v_k) * dirs_k`` (``dirs_k`` None: ones), by an inner
    backward through ``out``'s own graph."""

    @staticmethod
    def forward(ctx, out, vs, dirs, *es):
        ctx.out, ctx.vs, ctx.dirs = out, vs, dirs
        ctx.e_dtypes = [e.dtype for e in es]
        return out.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        used = [i for i, v in enumerate(ctx.vs) if v.requires_grad]
        got = torch.autograd.grad(ctx.out, [ctx.vs[i] for i in used], grad, retain_graph=True,
                                  allow_unused=True) if used else ()
        per_v = dict(zip(used, got))
        grads = []
        for i, (v, d, dtype) in enumerate(zip(ctx.vs, ctx.dirs, ctx.e_dtypes)):
            g = per_v.get(i)
            g = torch.zeros_like(v) if g is None else g
            grads.append((g if d is None else g * d).to(dtype))
        return (None, None, None, *grads)


def layer_gradient_sums(model, layer, inputs, baselines, target, table: torch.Tensor,
                        weights: torch.Tensor, *, direction: str = "ones",
                        directions: tuple | None = None,
                        attribute_to_layer_input: bool = False, additional_forward_args=None,
                        max_memory=None, chunk_size: int | None = None,
                        backend: str | None = None, progress: bool = False
                        ) -> AttributionResult:
    """``sum_s w_s dF/da (p(t_s)) * D_s`` per row, ``p(t) = b + t (x - b)`` in input space.

    Args:
        inputs, baselines: the rows' path ends, float tensors ``[R, ...]`` (tuples for several
            inputs; baselines dense, or None / numbers / broadcastable tensors).
        table: nodes ``t`` as float64 ``[R|1, S+1]`` (column ``S`` is only read by
            ``direction="next"``); weights: ``[S]`` (``w_s``).
        direction: ``"ones"``, ``"given"`` (``directions``, one ``[R, ...]`` tensor per
            activation tensor) or ``"next"`` (see :class:`LayerSpace`).
    Returns:
        :class:`AttributionResult`: ``attributions`` a tensor shaped like the activation (a
        tuple when the layer has several tensors); ``gap`` is NaN (not a completeness sum).
    """
    tup, fargs = inputs_tuple(inputs), forward_args(additional_forward_args)
    check_float_inputs(tup)
    bls = tuple(b.to(x.dtype) for b, x in zip(_baseline_inputs(baselines, tup), tup))
    spec = Layers(layer, attribute_to_layer_input)
    check_held(lambda args: spec.capture(model, args), tup, bls, fargs, max_memory,
               layer_space_bytes, chunk_size=chunk_size)
    acts = spec.capture(model, tup + fargs)
    S = weights.shape[0]
    if table.dim() != 2 or table.shape[1] != S + 1 or table.shape[0] not in (1, tup[0].shape[0]):
        raise ValueError(f"table must be [R|1, {S + 1}], got {tuple(table.shape)}")
    coords = tuple(torch.ones(a.shape, dtype=torch.float64, device=a.device) for a in acts)
    extra = (table.to(tup[0].device),) + tup + bls + tuple(directions or ()) + fargs
    with backends.selected(backend), spec.reaching_output(last_call=True):
        problem = make_problem(LayerSpace(model, spec, len(tup), direction), coords, 0.0,
                               target, extra)
        nodes = torch.arange(S, dtype=torch.float64)
        res = path_engine.integrate(problem, nodes, [weights.to(torch.float64)],
                                    max_memory=max_memory, chunk_size=chunk_size,
                                    progress=progress)
    parts = tuple(p.to(a.dtype) for p, a in zip(problem.split(res.sums[0]), acts))
    gap = torch.full((tup[0].shape[0],), float("nan"), dtype=torch.float64)
    return AttributionResult(parts if len(parts) > 1 else parts[0], gap, res.evaluations)


def check_float_inputs(tup: tuple[torch.Tensor, ...]) -> None:
    """``TypeError`` for integer inputs: these methods interpolate the inputs themselves."""
    for x in tup:
        if not (x.is_floating_point() or x.is_complex()):
            raise TypeError(
                f"this method runs its path in input space (p = b + t (x - b)) and cannot "
                f"interpolate {x.dtype} inputs such as token ids; attribute through the "
                f"embedding layer with layer integrated gradients, or pass the embeddings "
                f"(inputs_embeds) as the inputs")


def _rule_table(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rule == "adaptive" or quadrature.check_rule(rule) != rule:
        raise ValueError(f"rule {rule!r} is not a fixed rule; use one of "
                         f"{quadrature.CAPTUM_RULES}")
    return quadrature.nodes_and_weights(rule, steps)


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def internal_influence(model, layer, inputs, baselines=None, target=None, *, steps: int = 50,
                       rule: str = "gausslegendre", **kwargs) -> AttributionResult:
    """Internal influence ``II_j = int_0^1 dF/da_j (b + t (x - b)) dt`` (by the rule's
    ``steps`` nodes): the layer gradient integrated along the input-space path. ``kwargs``:
    ``attribute_to_layer_input``, ``additional_forward_args``, ``max_memory``,
    ``chunk_size``, ``backend``, ``progress`` as :func:`layer_gradient_sums`."""
    alphas, weights = _rule_table(rule, steps)
    table = torch.cat([alphas, alphas[-1:]]).to(torch.float64).unsqueeze(0)
    return layer_gradient_sums(model, layer, inputs, baselines, target, table, weights,
                               direction="ones", **kwargs)


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def layer_conductance(model, layer, inputs, baselines=None, target=None, *, steps: int = 50,
                      rule: str = "gausslegendre", **kwargs) -> AttributionResult:
    """Conductance ``C_j = sum_{s<S} dF/da_j (p_s) (a_j(p_{s+1}) - a_j(p_s))`` over the
    ``S + 1 = steps + 1`` nodes of the rule, ``p_s = b + t_s (x - b)`` (Captum's
    discretisation of ``int dF/da_j da_j`` along the path). ``kwargs`` as
    :func:`internal_influence`. ``steps`` must be an integer (``2.0`` too is refused, with
    Captum's ``TypeError``: Captum's conductance takes no float step count)."""
    why = f"conductance needs an integer steps >= 1, got {steps!r}"
    if isinstance(steps, bool) or not isinstance(steps, numbers.Real):
        raise TypeError(why)
    if not isinstance(steps, numbers.Integral):  # 2.5, also 2.0: Captum's TypeError too
        raise quadrature.NotWholeError(why)
    if steps < 1:
        raise ValueError(why)
    steps = int(steps)  # (numpy integers too, as Captum takes them)
    alphas, _ = _rule_table(rule, steps + 1)
    table = alphas.to(torch.float64).unsqueeze(0)
    return layer_gradient_sums(model, layer, inputs, baselines, target, table,
                               torch.ones(steps, dtype=torch.float64), direction="next",
                               **kwargs)


# bytes of a no-grad forward up to the layer per byte of the layer's activation, assumed
# when capturing rows in blocks under an explicit budget (the capture of every drawn row at
# once peaked at 16x of a 32 MB budget before the budget was checked)
CAPTURE_FACTOR = 8


def _activation_differences(model, spec: Layers, tup: tuple, bls: tuple, fargs: tuple,
                            max_memory) -> tuple:
    """``a(x_r) - a(b_r)`` for every row ``r`` (one tensor per activation tensor). Under an
    explicit ``max_memory`` what the call then holds must fit it (``MemoryError`` from one
    row's capture, before the others run: the differences, and the path's float64
    coordinates and sums over the activation), and the rows are captured in blocks."""
    if max_memory is None:
        return tuple(ax - ab for ax, ab in zip(spec.capture(model, tup + fargs),
                                               spec.capture(model, bls + fargs)))
    R = tup[0].shape[0]
    budget = memory.parse_budget(max_memory, tup[0].device)
    one, held = check_held(lambda args: spec.capture(model, args), tup, bls, fargs, budget,
                           layer_space_bytes, rows_are="drawn rows",
                           advice="draw fewer samples")
    per_row = sum(a.numel() * a.element_size() for a in one)
    out = tuple(a.new_empty((R,) + a.shape[1:]) for a in one)
    block = max(1, int((budget - held) // (2 * CAPTURE_FACTOR * per_row)))
    for r0 in range(0, R, block):
        rows = torch.arange(r0, min(R, r0 + block), device=tup[0].device)
        args = select_rows(fargs, rows, R)
        ax = spec.capture(model, tuple(t[rows] for t in tup) + args)
        ab = spec.capture(model, tuple(b[rows] for b in bls) + args)
        for o, x, b in zip(out, ax, ab):
            torch.sub(x, b, out=o[r0:r0 + len(rows)])
    return out


@flex_runs_eager_on_cpu  # (no backward through it on the CPU)
def layer_gradient_shap(model, layer, inputs, baselines, alphas: torch.Tensor, target=None, *,
                        multiply_by_inputs: bool = True, attribute_to_layer_input: bool = False,
                        additional_forward_args=None, **kwargs) -> AttributionResult:
    """Per sampled row ``r``: ``(a(x_r) - a(b_r)) dF/da (b_r + t_r (x_r - b_r))`` (without
    the factor when ``multiply_by_inputs=False``): the one-node path of layer GradientSHAP.

    Args: ``inputs``/``baselines`` ``[R, ...]`` (already noised and drawn), ``alphas [R]``;
    the rest as :func:`layer_gradient_sums`. Returns per-row attributions ``[R, ...act]``.
    """
    tup, fargs = inputs_tuple(inputs), forward_args(additional_forward_args)
    check_float_inputs(tup)
    a = alphas.to(torch.float64).reshape(-1, 1)
    table = torch.cat([a, a], dim=1)
    directions = None
    if multiply_by_inputs:
        spec = Layers(layer, attribute_to_layer_input)
        bls = _baseline_inputs(baselines, tup)
        directions = _activation_differences(model, spec, tup, bls, fargs,
                                             kwargs.get("max_memory"))
        kwargs["max_memory"] = memory.beside(  # (held through the path)
            kwargs.get("max_memory"), directions, tup[0].device,
            "the layer activations' differences", "draw fewer samples")
    return layer_gradient_sums(model, layer, tup, baselines, target, table,
                               torch.ones(1, dtype=torch.float64),
                               direction="given" if multiply_by_inputs else "ones",
                               directions=directions,
                               attribute_to_layer_input=attribute_to_layer_input,
                               additional_forward_args=fargs or None, **kwargs)
