"""Normalises what a user passes (inputs, baselines, target, forward args) into flat tensors.

A :class:`PathProblem` holds the inputs flattened and concatenated to ``x [B, D]`` and the
baselines to ``[Bb, K, D]`` (``Bb`` in {1, B}), and knows how to run the model on rows of
flattened points and pick the target output of each row. Every malformed argument raises a
``ValueError`` that names the argument and the shapes involved.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from taylor_kernels.engine import guards, memory
from taylor_kernels.engine.row_args import (RowFunction, args_form, check_row_args,
                                            forward_args, select_rows)
from taylor_kernels.models.outputs import model_output
from taylor_kernels.numerics import all_finite, check_dense_real


def as_tuple(inputs) -> tuple[tuple[torch.Tensor, ...], bool]:
    """``(tuple_of_inputs, was_tuple)``; a lone tensor becomes a 1-tuple."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), False
    if isinstance(inputs, (tuple, list)) and inputs and all(
            isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs), True
    raise inputs_error(inputs)


def _note_unbatched(exc: Exception, parts: tuple[torch.Tensor, ...]) -> None:
    """Add to ``exc`` (the model's own error on a batch of points) a note when every input
    is 1-D: dim 0 is read as the batch, so one example ``x [D]`` reached the model as ``N``
    scalars (a Linear said "mat1 and mat2 shapes cannot be multiplied (1x10 and 5x8)", the
    10 being the library's rows, not the user's shape)."""
    if parts and all(p.dim() == 1 for p in parts) and hasattr(exc, "add_note"):
        exc.add_note("taylor_kernels: the inputs are 1-D, and attribution reads their first "
                     "dimension as the batch (each row a scalar); for one example x of D "
                     "features pass x[None] ([1, D])")


def inputs_error(inputs) -> ValueError:
    """The error for ``inputs`` that are not a tensor or a non-empty tuple of tensors, naming
    what was given (a numpy array: ``torch.as_tensor``)."""
    container = isinstance(inputs, (tuple, list))
    parts = tuple(inputs) if container else (inputs,)
    wrong = [type(t).__name__ for t in parts if not isinstance(t, torch.Tensor)]
    got = (f"an empty {type(inputs).__name__}" if container and not parts else
           f"a {type(inputs).__name__} holding {wrong[0]}" if container else wrong[0])
    hint = "; convert with torch.as_tensor(x, dtype=torch.float32)" if any(
        type(t).__module__ == "numpy" for t in parts) else ""
    return ValueError(f"inputs must be a tensor or a non-empty tuple of tensors, got {got}"
                      f"{hint}")


def check_batch(inputs: tuple[torch.Tensor, ...]) -> int:
    """The batch size ``B`` of ``inputs``; ``ValueError`` unless every input has the same
    ``B > 0`` rows."""
    B = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if inputs and inputs[0].dim() and B == 0:
        raise ValueError(f"input 0 has shape {tuple(inputs[0].shape)}: an empty batch; give at "
                         "least one row")
    for i, t in enumerate(inputs):
        if t.dim() < 1 or t.shape[0] != B or B == 0:
            raise ValueError(f"input {i} has shape {tuple(t.shape)}; every input needs the same "
                             f"non-empty batch dimension (expected {B})")
    return B


def _check_inputs(inputs: tuple[torch.Tensor, ...]) -> int:
    """The batch size ``B`` of ``inputs`` (:func:`check_batch`); ``ValueError`` unless each
    is a dense, finite, real floating tensor (:func:`~taylor_kernels.numerics.check_dense_real`
    first: the finiteness check cannot read a sparse, meta or 8-bit float tensor)."""
    for i, t in enumerate(inputs):
        check_dense_real(t, f"input {i}")
    B = check_batch(inputs)
    for i, t in enumerate(inputs):
        if not t.is_floating_point():
            raise ValueError(f"input {i} has dtype {t.dtype}; attribution needs floating inputs "
                             "(for token ids: tk.token_integrated_gradients, or layer_integrated_gradients "
                             "on the embedding layer)")
        if not all_finite(t):
            raise ValueError(f"input {i} contains NaN or Inf values")
    return B


def _broadcasts(shape: tuple, feat: tuple) -> bool:
    return all(a in (1, b) for a, b in zip(shape, feat))


def _baseline_to_3d(bl, x: torch.Tensor, i: int) -> torch.Tensor:
    """One input's baseline as ``[Bb, K, D_i]`` (scalar, like one input, like the batch, or
    ``[B|1, K, ...]``; size-1 feature dimensions broadcast: ``[1, C, 1, 1]`` as in Captum,
    and ``[C, 1, 1]``, which Captum refuses)."""
    B, feat = x.shape[0], tuple(x.shape[1:])
    D = x[0].numel()
    if bl is None:
        return torch.zeros(1, 1, D, dtype=x.dtype, device=x.device)
    if not isinstance(bl, torch.Tensor):
        if isinstance(bl, (int, float)):
            return torch.full((1, 1, D), float(bl), dtype=x.dtype, device=x.device)
        raise ValueError(f"baseline {i} must be None, a number or a tensor, got {type(bl)}")
    check_dense_real(bl, f"baseline {i}")  # (before the cast: it dropped an imaginary part)
    bl = bl.to(device=x.device, dtype=x.dtype)
    shape = tuple(bl.shape)
    if shape == () or bl.numel() == 1 and shape != feat:
        return bl.reshape(1, 1, 1).expand(1, 1, D)
    if shape == feat:
        return bl.reshape(1, 1, D)
    if len(shape) == len(feat) + 1 and shape[1:] == feat and shape[0] in (1, B):
        return bl.reshape(shape[0], 1, D)
    if len(shape) == len(feat) + 2 and shape[2:] == feat and shape[0] in (1, B):
        _check_some_baselines(shape, i)
        return bl.reshape(shape[0], shape[1], D)
    if len(shape) == len(feat) and _broadcasts(shape, feat):   # e.g. [C, 1, 1]
        return bl.expand(feat).reshape(1, 1, D)
    if len(shape) == len(feat) + 1 and shape[0] in (1, B) and _broadcasts(shape[1:], feat):
        return bl.expand((shape[0],) + feat).reshape(shape[0], 1, D)   # e.g. [1, C, 1, 1]
    rows = f"{B} or 1" if B != 1 else "1"
    raise ValueError(f"baseline {i} of shape {shape} does not broadcast to input {i} of shape "
                     f"{tuple(x.shape)}: use {feat}, ({rows}, *{feat}) or "
                     f"({rows}, K, *{feat})")


def _check_some_baselines(shape: tuple, i: int) -> None:
    """``ValueError`` for a set of baselines ``[B|1, K, ...]`` with ``K = 0``: a mean over no
    paths (IG returned zeros with a NaN gap, second-order methods an IndexError)."""
    if shape[1] == 0:
        raise ValueError(f"baseline {i} of shape {shape} holds no baselines (K = 0 in "
                         "[B|1, K, ...]); give at least one, e.g. a [B, 1, ...] tensor, or "
                         "None for zeros")


def flatten_baselines(baselines, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """All inputs' baselines, flattened and concatenated: ``[Bb, K, D]`` (an input with one
    baseline, e.g. a scalar, keeps it for each of another input's ``K``)."""
    if isinstance(baselines, (tuple, list)):
        if len(baselines) != len(inputs):
            raise ValueError(f"{len(baselines)} baselines given for {len(inputs)} inputs")
        parts = [_baseline_to_3d(b, x, i) for i, (b, x) in enumerate(zip(baselines, inputs))]
    else:
        parts = [_baseline_to_3d(baselines, x, i) for i, x in enumerate(inputs)]
    Ks = {p.shape[1] for p in parts}
    if len(Ks - {1}) > 1:
        raise ValueError(f"inputs have different numbers of baselines per input: {sorted(Ks)}")
    Bb, K = max(p.shape[0] for p in parts), max(Ks)
    parts = [p.expand(Bb, K, -1) for p in parts]  # one baseline (a scalar) serves all K
    for i, p in enumerate(parts):
        if not all_finite(p):
            raise ValueError(f"baseline {i} contains NaN or Inf values")
    return torch.cat(parts, dim=2).contiguous()


def _no_float_target(target) -> None:
    """Targets are indices: refuse floats instead of truncating them."""
    bad = (isinstance(target, float) or isinstance(target, torch.Tensor) and (
        target.is_floating_point() or target.is_complex()) or isinstance(target, (tuple, list))
        and any(isinstance(t, float) or isinstance(t, (tuple, list)) and any(
            isinstance(u, float) for u in t) for t in target))
    if bad:
        raise TypeError(f"target must hold integer indices, got floats: {target!r}; pass an "
                        "int, a tuple of ints, an integer tensor or a list of these")


def _integer_indices(target) -> None:
    """Index tuples pick one output per row: refuse slices (or ``None``, ``...``) in them
    with a ``TypeError`` instead of failing on the range check."""
    tuples = [target] if isinstance(target, tuple) else [
        t if isinstance(t, (tuple, list)) else (t,) for t in target] \
        if isinstance(target, list) else []
    for t in tuples:
        for i in t:
            try:
                operator.index(i)
            except TypeError:
                raise TypeError(f"target must hold integer indices, got {i!r} in {target!r}: a "
                                "target picks one output per row; to attribute several, wrap "
                                "the model (e.g. lambda x: model(x)[:, 0:2].sum(1))") from None


def _target_rows(target, B: int, device) -> list | torch.Tensor | None:
    """Per-input targets: None, a long tensor [B], or a list of index tuples. Negative
    indices count from the end (as in Python and Captum); floats raise ``TypeError``."""
    if target is None:
        return None
    if type(target).__module__ == "numpy":  # np.int64(3), np.array([3, 3]): as torch's
        target = torch.as_tensor(target)  # (they were refused, numpy positions taken)
    _no_float_target(target)
    if isinstance(target, bool) or isinstance(target, torch.Tensor) and \
            target.dtype == torch.bool or isinstance(target, (tuple, list)) and any(
                isinstance(t, bool) for t in target):
        raise TypeError(f"target must hold integer indices, got booleans: {target!r}")
    _integer_indices(target)
    if isinstance(target, int):
        return torch.full((B,), target, dtype=torch.long, device=device)
    if isinstance(target, torch.Tensor):
        if target.numel() == 1:
            return torch.full((B,), int(target.item()), dtype=torch.long, device=device)
        if target.dim() == 1 and target.shape[0] == B:
            return target.to(device=device, dtype=torch.long)
        raise ValueError(f"target tensor of shape {tuple(target.shape)} must be a scalar or [{B}]")
    if isinstance(target, tuple):
        return IndexTuples([target] * B)
    if isinstance(target, list):
        if len(target) != B:
            raise ValueError(f"target list has {len(target)} entries for {B} inputs")
        if all(isinstance(t, int) for t in target):
            return torch.tensor(target, dtype=torch.long, device=device)
        return IndexTuples(tuple(t) if isinstance(t, (tuple, list)) else (t,) for t in target)
    raise ValueError(f"target must be an int, tuple, tensor or list, got {type(target)}")


def class_indices(target, B: int, C: int, device) -> torch.Tensor:
    """An int-like target (int, scalar or ``[B]`` integer tensor, list of ``B`` ints) as class
    indices ``[B]`` in ``[0, C)``: negatives count from the end, floats raise ``TypeError``,
    anything outside ``[-C, C)`` raises ``ValueError``."""
    rows = _target_rows(target, B, device)
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"target must be an int or a [{B}] integer tensor/list for a [B, {C}] "
                         f"output, got {target!r}")
    check_target(rows, (B, C))
    return torch.where(rows < 0, rows + C, rows)


@dataclass
class PathProblem:
    """A model with inputs and baselines flattened to ``x [B, D]`` and ``baselines [Bb, K, D]``."""

    model: Callable
    inputs: tuple[torch.Tensor, ...]
    was_tuple: bool
    x: torch.Tensor
    baselines: torch.Tensor
    target: Any
    forward_args: tuple
    row_check_pending: bool = False  # check R left to the first batch that can show mixing
    # a one-row batch's (point, row, output) kept for the randomness check; False once done
    row_check_sample: tuple | bool | None = None
    output_kind: str | None = None  # the type the model returned, when not a tensor
    scalar_row_checked: bool = False  # a one-row forward's 0-d output checked (two rows)

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def K(self) -> int:
        return self.baselines.shape[1]

    def split(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[N, D]`` rows back to a tuple of ``[N, *feature_shape_i]`` tensors."""
        sizes = [t[0].numel() for t in self.inputs]
        parts = torch.split(flat, sizes, dim=1)
        return tuple(p.reshape(flat.shape[0], *t.shape[1:]).to(t.dtype) if flat.dtype == self.x.dtype
                     else p.reshape(flat.shape[0], *t.shape[1:])
                     for p, t in zip(parts, self.inputs))

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """``[B, D]`` to the user's form: a tensor, or a tuple when inputs were a tuple."""
        parts = self.split(flat)
        return parts if self.was_tuple else parts[0]

    def _rows_args(self, rows: torch.Tensor) -> tuple:
        return select_rows(self.forward_args, rows, self.B)

    def attached_x(self) -> torch.Tensor:
        """The flattened inputs ``[B, D]`` still attached to the caller's inputs (``x`` itself
        when none requires grad): with them ``create_graph`` attributions are differentiable
        in the inputs (through the path points and the ``x - b`` factor)."""
        if not any(t.requires_grad for t in self.inputs):
            return self.x
        return torch.cat([t.reshape(self.B, -1) for t in self.inputs], dim=1).to(self.x.dtype)

    def row_output(self, row: int = 0) -> torch.Tensor:
        """The model's output for input ``row`` alone ``[1, ...]`` (no grad)."""
        rows = torch.full((1,), row, dtype=torch.long, device=self.x.device)
        with torch.no_grad():
            return guards.on_a_copy(lambda point: self.outputs(point, rows),
                                    self.x[row:row + 1])

    def outputs(self, flat_points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The model's whole outputs ``[N, ...]`` (what
        :func:`~taylor_kernels.models.outputs.model_output` reads) at ``N`` flattened points
        of inputs ``rows [N]`` (which pick the additional forward args)."""
        parts = self.split(flat_points)
        try:
            raw = self.model(*parts, *self._rows_args(rows))
        except Exception as exc:
            _note_unbatched(exc, parts)
            raise
        self.output_kind = None if isinstance(raw, torch.Tensor) else type(raw).__name__
        out = model_output(raw)
        if out.dim() == 0 and flat_points.shape[0] == 1 and not self.scalar_row_checked:
            self._check_scalar_row(flat_points, rows)
        return one_row_batch(out, flat_points.shape[0])

    def _check_scalar_row(self, point: torch.Tensor, row: torch.Tensor) -> None:
        """:func:`check_scalar_row` on the model's output for ``point [1, D]`` (of input
        ``row [1]``) twice: one forward of two rows (no grad, buffers kept), once per problem."""
        with torch.no_grad(), guards.preserved_buffers(self.model):
            check_scalar_row(self.model(*self.split(torch.cat([point, point])),
                                        *self._rows_args(row.repeat(2))))
        self.scalar_row_checked = True

    def forward(self, flat_points: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Selected model outputs ``[N]`` at ``N`` flattened points that belong to inputs
        ``rows`` ``[N]`` (which pick the target and the additional forward args). While check R
        is pending (:func:`make_problem` with ``defer_row_check``) the batch runs as a probe
        (buffers put back, train-mode modules behind a global named), its output and target
        are checked, and it completes check R (:meth:`finish_row_check`)."""
        if not self.row_check_pending:
            out = self.outputs(flat_points, rows)
            return select_target(out, self.target, rows, self.output_kind)
        first = flat_points[:1].detach().clone()  # before a model changing it in place ran
        with guards.probing(self.model):
            try:
                out = self.outputs(flat_points, rows)
            except RuntimeError as exc:  # autograd's error for an in-place change of the
                self._name_in_place_change(first, rows[:1], exc)  # points: name it
                raise
            self.check_output(out)
            self.finish_row_check(first, flat_points, rows, out)
        return select_target(out, self.target, rows, self.output_kind)

    def check_output(self, outputs: torch.Tensor) -> None:
        """``ValueError`` for a 0-d output, :class:`TargetIndexError` for a target outside the
        output (before it is gathered: on CUDA an out-of-range gather is a device assert)."""
        if outputs.dim() == 0:
            raise NoBatchOutputError(NO_BATCH_OUTPUT)
        try:
            check_target(self.target, (self.B,) + tuple(outputs.shape[1:]))
        except TargetIndexError as exc:
            hint = self._row_args_hint()
            if not hint:
                raise
            raise type(exc)(f"{exc}{hint}") from exc

    def _row_args_hint(self) -> str:
        """A sentence for an output that is smaller for one row than expected, when forward
        args were split per row (their first dimension is ``B``): a tensor shared by every
        row (a bank of class prompts for a batch of images) is split so too, and each row's
        output then has one entry (a CLIP zero-shot call with as many prompts as images)."""
        split = [i for i, a in enumerate(self.forward_args) if guards.is_row_tensor(a, self.B)]
        if not split:
            return ""
        return (f"; forward argument(s) {split} have B = {self.B} rows and were split per row "
                "(one row each beside its input); if one is shared by all rows (a bank of "
                "prompts), close over it in the model (a lambda or a wrapper module) instead "
                "(the Captum front passes it whole, as Captum, inside "
                "tk.allow_row_coupling(model))")

    def _name_in_place_change(self, first: torch.Tensor, row: torch.Tensor,
                              exc: BaseException) -> None:
        """Raise :data:`~taylor_kernels.engine.guards.IN_PLACE_ERROR` (from ``exc``) when the
        model changes a copy of the point ``first`` in place (one forward, no grad);
        anything else it raises is left to ``exc``."""
        try:
            with torch.no_grad():
                guards.on_a_copy(lambda p: self.outputs(p, row), first)
        except ValueError as named:
            if str(named) == guards.IN_PLACE_ERROR:
                raise named from exc
        except Exception:  # noqa: BLE001 - the batch's own error is the one to report
            pass

    def finish_row_check(self, first: torch.Tensor, points: torch.Tensor, rows: torch.Tensor,
                         outputs: torch.Tensor) -> None:
        """Check R from a batch of real points ``points [N, D]`` (inputs ``rows [N]``; ``first``
        a copy of ``points[:1]`` from before the batch ran) and its whole ``outputs``: when
        another point differs from the first in value or per-row forward args, the first
        point's output alone (one more forward of one row, on a copy, in the batch's grad
        mode: a model may take another path without grad, ``nn.TransformerEncoder``'s fast
        path; its saved tensors are not counted by a measuring caller) against
        ``outputs[:1]``. A batch that cannot show mixing (one point, or all alike) leaves
        the check to the next, and keeps its first row's output: if no batch can show mixing,
        :meth:`finish_row_check_at_end` computes that row again (a random model differs).
        Its forwards leave the buffers as they were."""
        if points.shape[0] < 2 or not self._differs_from_row0(points, rows):
            if self.row_check_sample is None:
                self.row_check_sample = (first, rows[:1], outputs[:1].detach(),
                                         torch.is_grad_enabled())
            return
        self.row_check_sample = False
        self.row_check_pending = False
        first_row = rows[:1]
        with _uncounted():
            alone = guards.on_a_copy(lambda p: self.outputs(p, first_row), first).detach()
        if tuple(alone.shape[1:]) != tuple(outputs.shape[1:]):
            raise ValueError(f"the model's output shape depends on the batch size: one row "
                             f"gives {tuple(alone.shape)}, {outputs.shape[0]} rows give "
                             f"{tuple(outputs.shape)}; it must return one output row per "
                             f"input row{self._row_args_hint()}")
        with guards.preserved_buffers(self.model):
            guards.check_alone_beside(alone, outputs[:1].detach(),
                                      lambda: self.outputs(first.clone(), first_row).detach(),
                                      self._precision())

    def finish_row_check_at_end(self) -> None:
        """After a pass whose every batch was one row (or alike): the kept row computed again
        (one forward, in the grad mode it ran in: a model may take another path without
        grad, ``nn.TransformerEncoder``'s fast path): a random model gives another output
        (``F.dropout(x, training=self.training)``, ``torch.randn`` noise). Rows could not mix
        in those batches; the mixing check stays pending for a later batch of several rows
        (GradientShap's endpoint batch for its delta)."""
        if not self.row_check_pending or not isinstance(self.row_check_sample, tuple):
            return
        first, row, out, grad_mode = self.row_check_sample
        self.row_check_sample = False  # (randomness checked: no sample kept again)

        def again():
            return self.outputs(first.clone(), row).detach()

        with guards.probing(self.model), torch.set_grad_enabled(grad_mode), _uncounted():
            guards.check_alone_beside(again(), out, again, self._precision())

    def finish_row_check_now(self) -> None:
        """Complete a pending check R without a batch of real points: row 0 alone (its output
        and target checked) and beside a row that differs from it (two forwards; before a CUDA
        graph capture, where the check's host syncs would break the capture)."""
        if not self.row_check_pending:
            return
        self.row_check_pending = False
        with guards.probing(self.model), torch.no_grad():
            self._two_row_check()

    def _two_row_check(self) -> None:
        """Row 0 alone (its output and target checked), then beside a row that differs from
        it (check R's two forwards; the caller probes)."""
        alone = self.row_output(0)
        self.check_output(alone)
        other, j = guards.distinct_row(self.x, self.baselines[0, 0], *self._row_tensors())
        with guards.preserved_buffers(self.model):
            guards.check_rows_independent(self.outputs, self.x[0], other, j, alone=alone)

    def _precision(self) -> torch.dtype | None:
        return self.x.dtype if self.x.is_floating_point() else None

    def row_function(self) -> RowFunction:
        """The selected outputs ``[N]`` as a function of ``N`` flattened points of any rows of
        the batch (:class:`~taylor_kernels.engine.row_args.RowFunction`): the derivative and
        jet engines call it on slices and probes of the rows, which pick each point's target
        and forward args; measured costs are cached under the model."""
        return RowFunction(self.forward, self.B, self.model,
                           getattr(self.model, "cost_owner", self.model),
                           tuple(self._row_tensors()),
                           args_form(self.forward_args, self.B))

    def _row_tensors(self) -> list[torch.Tensor]:
        return [a for a in self.forward_args if guards.is_row_tensor(a, self.B)]

    def _differs_from_row0(self, points: torch.Tensor, rows: torch.Tensor) -> bool:
        if not torch.equal(points[1], points[0]):  # (usually: no scan of the whole batch)
            return True
        per_row = [a.index_select(0, rows.to(a.device)) for a in self._row_tensors()]
        return bool(guards.rows_differing([points] + per_row).any())


@contextlib.contextmanager
def _uncounted():
    """Context: tensors saved for backward inside it bypass a measuring caller's
    saved-tensor hooks (:class:`~taylor_kernels.engine.memory.SavedBytes`): check R's own
    one-row forwards are not the chunk's cost (a detached alias, as there, so a graph never
    run backward is not kept alive). Also inside a caller's ``disable_saved_tensors_hooks``
    block (:func:`~taylor_kernels.engine.memory.saved_hooks_enabled`). Nothing while no
    measurement is open (a hook call per saved tensor: up to 0.8 ms of a small call)."""
    if not memory.counting():
        yield
        return
    with memory.saved_hooks_enabled(), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t):
        yield


NO_BATCH_OUTPUT = ("the model must return a tensor with a batch dimension (one output row per "
                   "input row), got a 0-d output")


def one_row_batch(out: torch.Tensor, n: int) -> torch.Tensor:
    """``out`` of a forward of ``n`` rows, with the batch dimension a forward ending in
    ``.squeeze()`` drops when ``n == 1`` put back (Captum never runs one row; our probes do).
    A 0-d output of one row may instead be one scalar for the whole batch: callers check it
    once with :func:`check_scalar_row`."""
    if n == 1 and (out.dim() == 0 or out.shape[0] != 1):
        return out.unsqueeze(0)
    return out


def rows_twice(args: tuple) -> tuple:
    """The arguments of a forward of one row for a batch of that row twice: each tensor with a
    first dimension (of size 1 there: the points, per-row and shared forward args) doubled."""
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a
                 for a in args)


def check_scalar_row(two_rows_out) -> None:
    """A forward of one row gave a 0-d output: a forward ending in ``.squeeze()`` (which gives
    ``[2, ...]`` for two rows), or one scalar for the whole batch, which Captum refuses with
    an ``IndexError`` (:class:`NoBatchOutputError`). ``two_rows_out``: the same forward's
    output for that row twice (:func:`rows_twice`)."""
    two = model_output(two_rows_out)
    if two.dim() == 0 or two.shape[0] != 2:
        raise NoBatchOutputError(f"{NO_BATCH_OUTPUT} for one row and {tuple(two.shape)} for "
                                 "two: one value for the whole batch")


def select_target(out: torch.Tensor, target, rows: torch.Tensor,
                  kind: str | None = None) -> torch.Tensor:
    """Pick each row's target from model output ``[N, ...]`` (a tensor, or what
    :func:`~taylor_kernels.models.outputs.model_output` reads: ``.logits``...); returns ``[N]``.
    ``kind``: the type the model returned when ``out`` was read from it (errors name it)."""
    kind = kind or (None if isinstance(out, torch.Tensor) else type(out).__name__)
    out = model_output(out)
    N = rows.shape[0]
    if out.dim() == 0:
        raise NoBatchOutputError(NO_BATCH_OUTPUT)
    if out.shape[0] != N:
        raise ValueError(f"model output of shape {tuple(out.shape)} has no batch dimension of "
                         f"size {N}; it must return one output row per input row")
    if target is None:
        if out[0].numel() != 1:
            raise ValueError(f"model output per row has shape {tuple(out.shape[1:])}: pass a "
                             "target to select one scalar per input")
        return out.reshape(N)
    if isinstance(target, torch.Tensor):
        if out.dim() > 2 and singleton_rest(out.shape, 1):  # [N, C, 1, ...] (a pooled map)
            out = out.reshape(N, out.shape[1])
        if out.dim() != 2:
            read = (f" (read from the model's {kind}: a mapping's 'logits' or first tensor, a "
                    "tuple's first tensor; to attribute another, wrap the model, e.g. "
                    "lambda x: model(x)[1])") if kind else ""
            per_row = "one scalar" if out.dim() == 1 else f"{tuple(out.shape[1:])}"
            outside = out.dim() > 2 and bool(((target < -out.shape[1]) |
                                              (target >= out.shape[1])).any())
            # (out of range, Captum's indexing raises an IndexError first)
            raise (TargetIndexError if outside else ValueError)(
                f"an integer target needs a [N, C] model output (C classes per "
                f"row, or [N, C, 1, ...]); the model returns {per_row} per row"
                + (": pass target=None" if out.dim() == 1 else "") + read
                + (f", and the target is outside its first {out.shape[1]}" if outside else ""))
        idx = target.to(out.device)[rows]
        idx = torch.where(idx < 0, idx + out.shape[1], idx)  # negatives count from the end
        return out.gather(1, idx.unsqueeze(1)).squeeze(1)
    idx = target.on(out.device) if isinstance(target, IndexTuples) else None
    if idx is not None and idx.shape[1] < out.dim() - 1 and singleton_rest(out.shape,
                                                                           idx.shape[1]):
        out = out.reshape(out.shape[:1 + idx.shape[1]])  # the size-1 dims no index names
    if idx is not None and idx.shape[1] == out.dim() - 1:  # one gather, no host read of rows
        idx = idx[rows.to(out.device)]
        dims = torch.tensor(out.shape[1:], device=out.device)
        idx = torch.where(idx < 0, idx + dims, idx)  # negatives count from the end
        return out[(torch.arange(N, device=out.device), *idx.unbind(1))]
    picked = [out[(n,) + tuple(target[int(r)])].reshape(())  # (size-1 dims left: one value)
              for n, r in enumerate(rows.tolist())]
    return torch.stack(picked)


class IndexTuples(list):
    """Per-row target index tuples (a list, as every caller reads them) that make their
    ``[B, k]`` long tensor once per device (:meth:`on`): each chunk read its rows on the host
    to index the list, a sync per chunk on CUDA and no CUDA graph for such targets."""

    def on(self, device: torch.device) -> torch.Tensor | None:
        """The tuples as a ``[B, k]`` long tensor on ``device``; None when they differ in
        length."""
        made = self.__dict__.setdefault("_on", {})
        key = str(device)
        if key not in made:
            made[key] = torch.tensor(self, dtype=torch.long).to(device) \
                if len({len(t) for t in self}) == 1 else None
        return made[key]


def target_values(out, target) -> torch.Tensor:
    """Each input's target output ``[B]`` from a whole-batch model output ``out [B, ...]``
    (``target`` as :func:`make_problem` takes it)."""
    whole = model_output(out)
    if whole.dim() == 0:
        raise NoBatchOutputError(NO_BATCH_OUTPUT)
    rows = torch.arange(whole.shape[0], device=whole.device)
    targets = _target_rows(target, whole.shape[0], rows.device)
    check_target(targets, tuple(whole.shape))  # (before a gather: a device assert on CUDA)
    return select_target(out, targets, rows)


class NoBatchOutputError(ValueError, IndexError):
    """A model that returns a 0-d output: a ``ValueError``, and the ``IndexError`` Captum's
    indexing of the missing batch dimension raises."""


class TargetIndexError(ValueError, IndexError):
    """A target outside the model's output: a ``ValueError``, and the ``IndexError`` that
    indexing (and Captum) raises for it."""


class TargetTensorIndexError(TargetIndexError, RuntimeError):
    """A ``[B]`` tensor target outside the model's outputs: also the ``RuntimeError`` that
    gathering with it (and Captum) raises."""


class TargetShapeError(ValueError):
    """A tuple target with another number of indices than the per-row output has dims (the
    Captum front raises it as Captum's ``AssertionError``)."""


def singleton_rest(out_shape: Sequence[int], k: int) -> bool:
    """Whether every dim of an output ``[N, ...]`` after the batch and the ``k`` dims a target
    indexes has size 1: such a target picks one value per row (as Captum's
    ``output[:, target]``, e.g. class ``c`` of a ``[N, C, 1, 1]`` pooled map)."""
    return all(s == 1 for s in out_shape[1 + k:])


def _indices_needed(per_row: Sequence[int]) -> str:
    """How many indices a tuple target needs for a per-row output shape (fewer may leave only
    size-1 dims)."""
    least = max((i + 1 for i, s in enumerate(per_row) if s != 1), default=0)
    return str(len(per_row)) if least == len(per_row) else f"{least} to {len(per_row)}"


def check_target(target, out_shape: Sequence[int]) -> None:
    """Raise :class:`TargetIndexError` if a target indexes outside the model's per-row output
    shape (:class:`TargetTensorIndexError` for a tensor target), :class:`TargetShapeError` if
    a tuple target leaves more than one value per row (or has more indices than that shape
    has dims). Dims of size 1 after the indexed ones need no index (:func:`singleton_rest`)."""
    if target is None:
        return
    if isinstance(target, torch.Tensor):
        C = out_shape[1] if len(out_shape) >= 2 and singleton_rest(out_shape, 1) else None
        if C is not None and ((target < -C) | (target >= C)).any():
            raise TargetTensorIndexError(f"target {target.tolist()} out of range for {C} "
                                         "outputs")
        return
    for t in target:
        if len(t) > len(out_shape) - 1 or not singleton_rest(out_shape, len(t)):
            raise TargetShapeError(f"target {t} has {len(t)} indices; the per-row output shape "
                                   f"{tuple(out_shape[1:])} needs "
                                   f"{_indices_needed(out_shape[1:])}")
        if any(not -s <= i < s for i, s in zip(t, out_shape[1:])):
            raise TargetIndexError(f"target {t} out of range for per-row output shape "
                                   f"{tuple(out_shape[1:])}")


def make_problem(model: Callable, inputs, baselines=None, target=None,
                 additional_forward_args=None, *, defer_row_check: bool = False,
                 checked_output: torch.Tensor | None = None,
                 higher_order: str | None = None) -> PathProblem:
    """Validate and flatten a call's arguments into a :class:`PathProblem`.

    Probes the model on row 0 alone (output shape, target range) and runs check R
    (:mod:`~taylor_kernels.engine.guards`) with a second forward; with ``defer_row_check``
    no probe runs here: the first batch of real points that can show row mixing checks the
    output and completes check R with one more forward of one row
    (:meth:`PathProblem.finish_row_check`), saving a forward of one and one of two rows per
    call (on a small GradientShap call they were a third of its time). ``checked_output``: one row's whole output
    alone ``[1, ...]`` from a forward the caller ran (it gives the output shape), check R
    done by the caller (:func:`~taylor_kernels.attr.layer_ends.layer_ends`): no probe
    forward at all. ``higher_order``: the calling second-order method's name, which
    :func:`~taylor_kernels.engine.guards.check_model` refuses for a model that couples rows
    also inside ``allow_row_coupling``."""
    if not callable(model):
        raise ValueError("model must be callable")
    tup, was_tuple = as_tuple(inputs)
    B = _check_inputs(tup)
    x = torch.cat([t.detach().reshape(B, -1) for t in tup], dim=1)
    bl = flatten_baselines(baselines, tup)
    fargs = forward_args(additional_forward_args)
    check_row_args(fargs, B)
    problem = PathProblem(model, tup, was_tuple, x, bl, _target_rows(target, B, x.device), fargs)
    guards.check_model(model, tup, higher_order)
    if checked_output is not None:
        check_target(problem.target, (B,) + tuple(model_output(checked_output).shape[1:]))
        return problem
    if defer_row_check and not guards.row_coupling_allowed():
        problem.row_check_pending = True  # (no forward here: no buffers to snapshot, which
        return problem  # cost 2-3 ms on a model with 52 batch norms)
    with guards.probing(model):  # the probes leave running statistics as they were, also a
        # model's behind a global, whose train-mode modules are then named
        if guards.row_coupling_allowed():  # no check R; batch statistics need two rows
            pair = torch.cat([problem.x[:2], problem.baselines[0, :1]])[:2]
            rows = torch.zeros(2, dtype=torch.long, device=pair.device)
            rows[:min(B, 2)] = torch.arange(min(B, 2), device=pair.device)
            with torch.no_grad():
                shape = model_output(problem.outputs(pair, rows)).shape[1:]
            check_target(problem.target, (B,) + tuple(shape))
            return problem
        problem._two_row_check()  # its first forward is the shape probe
    return problem
