"""The unification table: the fourteen methods x the three principles on one model and input.

For each method: P1 measured on the model itself; P2, P3 and the allocation summaries from the
shares it gives the model's largest Taylor terms (probe networks, see
:mod:`taylor_kernels.attr.unification`), weighted by the terms' magnitudes. Summaries:
``indep_self`` = mean share of a single-feature term given to its owner (1 is fair),
``inter_members`` = mean total share of an interaction term given to its members (1 is fair),
``inter_outside`` = mean ``sum |share|`` given to non-members (0 is fair).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from taylor_kernels.attr.taylor_decomposition import taylor_decomposition
from taylor_kernels.attr.unification import (METHOD_NAMES, MethodSettings, Term, allocation,
                                             itemized_terms, method_settings, not_applicable,
                                             principle_departures, run_method, select_terms)
from taylor_kernels.progress import progress_bar
from taylor_kernels.engine.guards import public_call


@dataclass
class MethodRow:
    """One method's line of the table (None where a quantity does not apply)."""

    method: str
    p1: float | None
    p2: float | None
    p3: float | None
    indep_self: float | None
    inter_members: float | None
    inter_outside: float | None
    seconds: float
    note: str = ""


@dataclass
class UnificationTable:
    """Rows per method plus the Taylor bookkeeping of the input: ``delta = f(x) - f(b)``, the
    decomposition residual at ``order``, the highest itemized order, and ``coverage`` = share of
    the itemized terms' total ``|T|`` that the probed terms carry."""

    rows: list[MethodRow]
    delta: float
    residual: float
    order: int
    itemized_order: int
    terms_probed: int
    coverage: float

    def markdown(self) -> str:
        """The table in markdown (departures: 0 = principle satisfied)."""
        def fmt(v):
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
        head = ("| method | P1 completeness | P2 independent | P3 interaction | indep self | "
                "inter members | inter outside | s |\n|---|---|---|---|---|---|---|---|")
        lines = [head] + [
            f"| {r.method} | {fmt(r.p1)} | {fmt(r.p2)} | {fmt(r.p3)} | {fmt(r.indep_self)} | "
            f"{fmt(r.inter_members)} | {fmt(r.inter_outside)} | {r.seconds:.2f} |"
            for r in self.rows]
        lines.append(f"\nf(x) - f(b) = {self.delta:.4g}; Taylor residual at order {self.order}: "
                     f"{self.residual:.3g}; terms itemized to order {self.itemized_order}, "
                     f"{self.terms_probed} probed carrying {self.coverage:.1%} of their mass.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self, path=None):
        """Figure of the table, one row per method; saved as a PNG to ``path`` when given
        (missing folders are created). Returns the Figure (axes: bars, heatmap, colour bar).

        Left: bars of the departures P1, P2, P3 (0 = satisfied) on a symlog axis whose linear
        part ends at the decade of the smallest nonzero departure (at most 1e-3), each bar
        labelled with its value; a principle that does not apply (None or NaN: ``note`` says
        why) has no bar but a grey "n/a". Right: the six columns, cells coloured by the
        departure from the ideal ``|v - ideal|`` (ideal 1 for ``indep_self`` and
        ``inter_members``, 0 for the rest; white = ideal, symlog scale from 0 to at least 1,
        grey = n/a) and labelled with the signed value.
        """
        from taylor_kernels.plots import new_figure, save_figure
        data = torch.tensor([[float("nan") if getattr(r, c) is None else getattr(r, c)
                              for c in PLOT_COLUMNS] for r in self.rows], dtype=torch.float64)
        names = [r.method for r in self.rows]
        fig = new_figure(figsize=(14, 0.4 * len(names) + 2))
        bars, heat = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        _departure_bars(bars, names, data[:, :3])
        _ideal_heatmap(fig, heat, names, data)
        fig.tight_layout()
        save_figure(fig, path)
        return fig


PLOT_COLUMNS = ("p1", "p2", "p3", "indep_self", "inter_members", "inter_outside")
IDEAL = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # of PLOT_COLUMNS
PRINCIPLES = ("P1 completeness", "P2 independent", "P3 interaction")


def _linthresh(values: torch.Tensor) -> float:
    """Symlog linear threshold: the power of ten at or below the smallest positive finite
    value, clipped to [1e-12, 1e-3] (1e-3 when none is positive)."""
    pos = values[torch.isfinite(values) & (values > 0)]
    if pos.numel() == 0:
        return 1e-3
    return 10.0 ** min(max(math.floor(math.log10(float(pos.min()))), -12), -3)


def _departure_bars(ax, names: list[str], dep: torch.Tensor) -> None:
    """Horizontal bars of ``dep [methods, 3]`` (P1..P3) on a symlog axis, each labelled with
    its value; a NaN gets no bar and a grey "n/a" label at the axis origin."""
    linthresh = _linthresh(dep)
    for j, label in enumerate(PRINCIPLES):
        ys = [i + (j - 1) * 0.27 for i in range(len(names))]
        ok = [i for i in range(len(names)) if math.isfinite(float(dep[i, j]))]
        ax.barh([ys[i] for i in ok], [float(dep[i, j]) for i in ok], height=0.27, label=label)
        for i, y in enumerate(ys):
            v = float(dep[i, j])
            na = not math.isfinite(v)
            ax.annotate("n/a" if na else f"{v:.2g}", (0 if na else v, y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=6.5,
                        color="dimgrey" if na else "black", fontstyle="italic" if na else "normal")
    top = float(dep.nan_to_num(0.0).max().clamp(min=linthresh))
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.xaxis.get_major_locator().set_params(numticks=9)  # (every k-th decade past 8)
    ax.set_xlim(0, top * 10)  # (one decade of room for the value labels)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("departure from the principle (0 = satisfied, n/a = does not apply)")
    ax.legend(fontsize=7, ncol=3, loc="lower left", bbox_to_anchor=(0, 1))  # (above: no overlap)


def _ideal_heatmap(fig, ax, names: list[str], data: torch.Tensor) -> None:
    """Cells of ``data [methods, 6]`` coloured by ``|data - IDEAL|`` (white 0, symlog from 0 to
    at least 1, grey NaN), labelled with the signed values, with a labelled colour bar."""
    from matplotlib import colormaps
    from matplotlib.colors import SymLogNorm
    off = (data - IDEAL).abs()
    norm = SymLogNorm(linthresh=1e-3, vmin=0.0, vmax=max(1.0, float(off.nan_to_num(0).max())))
    cmap = colormaps["Reds"].with_extremes(bad="lightgrey")
    im = ax.imshow(off.numpy(), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(PLOT_COLUMNS)), [f"{c}\n(ideal {i:g})" for c, i in
                                             zip(PLOT_COLUMNS, IDEAL.tolist())],
                  fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(data.tolist()):
        for j, v in enumerate(row):
            dark = math.isfinite(v) and norm(float(off[i, j])) > 0.6  # (white text on dark red)
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.3g}", ha="center", va="center",
                    fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=ax).set_label("|value - ideal| (white = ideal, grey = n/a)", fontsize=8)


ROUNDOFF_TERMS = 64  # eps of the input dtype times this, relative to the largest: round-off
P1_UNDEFINED = "P1 n/a: f(x) - f(b) is 0 to round-off"


def _relative_gap(gap: float, delta: float, fx: float, dtype: torch.dtype) -> float:
    """P1 = ``|gap| / |f(x) - f(b)|``, NaN where ``f(x) - f(b)`` is 0 to round-off (an even
    model with ``b = -x``, or ``x = b``: a 1e-17 gap of IG, a complete method, read 7.5e283)."""
    if abs(delta) <= ROUNDOFF_TERMS * torch.finfo(dtype).eps * max(abs(fx), abs(fx - delta)):
        return float("nan")
    return abs(gap) / abs(delta)


def _summaries(terms: list[Term], W: torch.Tensor) -> tuple[float, float, float]:
    """Magnitude-weighted mean owner share, member total and outside ``sum |w|``."""
    acc = {"self": [0.0, 0.0], "members": [0.0, 0.0], "outside": [0.0, 0.0]}
    for t, w in zip(terms, W):
        idx = list(t.support)
        mag = abs(t.value)
        if len(idx) == 1:
            acc["self"][0] += mag * float(w[idx[0]])
            acc["self"][1] += mag
        else:
            outside = float(w.abs().sum() - w[idx].abs().sum())
            acc["members"][0] += mag * float(w[idx].sum())
            acc["outside"][0] += mag * outside
            acc["members"][1] += mag
            acc["outside"][1] += mag
    return tuple(n / d if d > 0 else float("nan") for n, d in acc.values())


def _no_terms_note(itemized: int, order: int, max_sets: int) -> str:
    """Why a table probed no term: none itemized (order 1 alone has more than ``max_sets``
    features), or every itemized term is 0 at the baseline."""
    if itemized == 0:
        return (f"no probe: no order itemized (the features alone are more than max_sets="
                f"{max_sets}); raise max_sets")
    return f"no probe: every Taylor term to order {itemized} is 0 at the baseline"


def _method_row(name: str, model, inputs, baselines, target, settings: MethodSettings, dec,
                probed: list[Term], top: int, order: int, max_sets: int) -> MethodRow:
    """Method ``name``'s row: P1 against the decomposition ``dec``, P2, P3 and the summaries
    from its shares of the ``probed`` terms (a note where one does not apply)."""
    t0 = time.perf_counter()
    why = not_applicable(name, model, inputs, settings.window)
    if why:
        return MethodRow(name, None, None, None, None, None, None, 0.0, why)
    res = run_method(name, model, inputs, baselines, target, settings)
    delta = float(dec.fx[0] - dec.fb[0])
    p1 = _relative_gap(float(res.gap[0]), delta, float(dec.fx[0]), inputs.dtype)
    undefined = [P1_UNDEFINED] if math.isnan(p1) else []
    if name == "grad_cam" or not probed:
        return MethodRow(name, p1, None, None, None, None, None, time.perf_counter() - t0,
                         "; ".join(undefined + ["no probe: needs a convolution"
                                                if name == "grad_cam"
                                                else _no_terms_note(top, order, max_sets)]))
    W = torch.stack([allocation(name, t.kappa, inputs, baselines, settings) for t in probed])
    p2, p3 = principle_departures(probed, W)
    return MethodRow(name, p1, p2, p3, *_summaries(probed, W),
                     seconds=time.perf_counter() - t0, note="; ".join(undefined))


@public_call
def unification_table(model, inputs, baselines=None, target=None, *, order: int = 3,
                      max_terms: int = 24, max_sets: int = 20000,
                      settings: MethodSettings | None = None,
                      methods=METHOD_NAMES, progress: bool = False) -> UnificationTable:
    """Score ``methods`` on one input ``[1, ...]`` of ``model`` (see module docstring).

    Args:
        model, inputs, baselines, target: as :func:`taylor_decomposition` (``B = 1``).
        order: Taylor order of the decomposition (residual) and of the itemized terms;
        max_terms: terms probed at most (half single-feature, half interactions, largest
            ``|T|``; terms at round-off level, below ``64 eps`` of the largest, are none);
        max_sets: itemize an order only if it has at most this many multisets;
        settings: :class:`MethodSettings` or a dict of its fields (background, sample
            counts, seed);
        progress: a tqdm bar over the steps: the decomposition, the itemized terms, then one
            per method (its run and its probes), the running one in its postfix.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"unification_table scores one tensor input [1, ...], got "
                        f"{type(inputs).__name__}")
    if inputs.shape[0] != 1:
        raise ValueError("unification_table scores one input: inputs must be [1, ...]")
    if isinstance(methods, str):  # (one name: not its characters)
        methods = (methods,)
    if isinstance(max_terms, bool) or not isinstance(max_terms, int) or max_terms < 1:
        raise ValueError(f"max_terms must be a positive integer, got {max_terms!r}")
    if not methods:
        raise ValueError(f"methods must name at least one of {METHOD_NAMES}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {METHOD_NAMES}")
    settings = method_settings(settings)
    with progress_bar(progress, total=2 + len(methods), desc="unification table",
                      unit="step") as bar:
        bar.set_postfix_str("Taylor decomposition")
        dec = taylor_decomposition(model, inputs, baselines, target, order=order)
        bar.update()
        bar.set_postfix_str("itemized terms")
        terms, top = itemized_terms(model, inputs, baselines, target, order=order,
                                    max_sets=max_sets)
        bar.update()
        probed = select_terms(terms, max_terms, ROUNDOFF_TERMS * torch.finfo(inputs.dtype).eps)
        rows = []
        for name in methods:
            bar.set_postfix_str(name)
            rows.append(_method_row(name, model, inputs, baselines, target, settings, dec,
                                    probed, top, order, max_sets))
            bar.update()
    total = sum(abs(t.value) for t in terms)
    return UnificationTable(rows, float(dec.fx[0] - dec.fb[0]), float(dec.residual[0]), order,
                            top, len(probed),
                            sum(abs(t.value) for t in probed) / max(total, 1e-300))
