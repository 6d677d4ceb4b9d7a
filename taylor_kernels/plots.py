"""Figures for interaction results (matplotlib Agg canvas, imported only when called).

- :func:`interaction_heatmap`: a ``[n, n]`` matrix of pairwise strengths (e.g. a
  :class:`~taylor_kernels.attr.interactions.GlobalInteractions` ``strengths`` or one row of
  ``tk.interactions(...).strengths``), with a colour bar;
- :func:`taylor_cam_overlay`: an image beside the same image with a Taylor-CAM map (``[h, w]``,
  e.g. ``tk.taylor_cam(...).cell_map()[b]``) upsampled bilinearly and overlaid.

Each returns the ``matplotlib.figure.Figure`` and writes a PNG when ``path`` is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

MAX_FIGURE_INCHES = 16.0  # heatmap side at most (1760 px at 110 dpi): n = 200 made 91 in
MAX_TICK_LABELS = 60  # per axis; more are unreadable at MAX_FIGURE_INCHES


def new_figure(**kw):
    """A Figure on the Agg canvas, outside pyplot's registry (nothing to close, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> None:
    """Write ``fig`` as a PNG (110 dpi, tight box) to ``path``, creating missing parent
    folders; nothing when ``path`` is None."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")


def _numpy(t, name: str, dims: tuple[int, ...]):
    t = torch.as_tensor(t).detach().cpu().double()
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape "
                         f"{tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    return t


def _heatmap_size(n: int) -> tuple[float, float]:
    """Figure ``(width, height)`` in inches: 0.45 in per feature, capped at
    ``MAX_FIGURE_INCHES`` (the cells shrink beyond ~33 features)."""
    return (min(1.2 + 0.45 * n, MAX_FIGURE_INCHES), min(0.9 + 0.45 * n, MAX_FIGURE_INCHES))


def _thinned_ticks(names: list[str]) -> tuple[list[int], list[str]]:
    """Every ``ceil(n / MAX_TICK_LABELS)``-th position and its name (all when ``n`` is at most
    ``MAX_TICK_LABELS``)."""
    step = -(-len(names) // MAX_TICK_LABELS)
    pos = list(range(0, len(names), step))
    return pos, [names[i] for i in pos]


def interaction_heatmap(matrix, labels: Sequence[str] | None = None, *, title: str = "",
                        cmap: str = "viridis", mask_diagonal: bool = True, path=None):
    """Heatmap of a square interaction matrix ``[n, n]`` (diagonal blanked by default: it holds
    self-terms, not interactions); ``labels`` name the ``n`` features. The figure is at most
    ``MAX_FIGURE_INCHES`` a side and labels at most ``MAX_TICK_LABELS`` features per axis
    (every k-th beyond that). Returns the Figure (two axes: the map and its colour bar)."""
    m = _numpy(matrix, "matrix", (2,))
    n = m.shape[0]
    if m.shape[1] != n or n == 0:
        raise ValueError(f"matrix must be square and non-empty, got shape {tuple(m.shape)}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for a {n} x {n} matrix")
    if mask_diagonal:
        m = m.clone()
        m.fill_diagonal_(float("nan"))
    fig = new_figure(figsize=_heatmap_size(n))
    ax = fig.subplots()
    im = ax.imshow(m.numpy(), cmap=cmap)
    pos, names = _thinned_ticks(list(labels) if labels is not None else [str(i) for i in range(n)])
    ax.set_xticks(pos, names, rotation=90 if n > 12 else 0, fontsize=8)
    ax.set_yticks(pos, names, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def taylor_cam_overlay(image, cam, *, title: str = "", alpha: float = 0.5,
                       cmap: str = "jet", path=None):
    """An image (``[H, W]``, ``[C, H, W]`` with C in {1, 3}, values any range) beside the image
    with ``cam [h, w]`` resized to ``H x W`` (bilinear) and overlaid with opacity ``alpha``.
    Returns the Figure (three axes: image, overlay, colour bar)."""
    img = _numpy(image, "image", (2, 3))
    if img.dim() == 3:
        if img.shape[0] not in (1, 3):
            raise ValueError(f"image [C, H, W] needs C = 1 or 3, got {tuple(img.shape)}")
        img = img.permute(1, 2, 0).squeeze(-1)
    finite = img[torch.isfinite(img)]  # (one NaN pixel made lo and hi NaN: a black image)
    lo, hi = (finite.min(), finite.max()) if finite.numel() else (0.0, 0.0)
    img = ((img - lo) / (hi - lo)).nan_to_num(0.0) if hi > lo else torch.zeros_like(img)
    c = _numpy(cam, "cam", (2,))
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    up = torch.nn.functional.interpolate(c[None, None], size=tuple(img.shape[:2]),
                                         mode="bilinear", align_corners=False)[0, 0]
    fig = new_figure(figsize=(6.4, 3.2))
    ax0, ax1 = fig.subplots(1, 2)
    gray = "gray" if img.dim() == 2 else None
    ax0.imshow(img.numpy(), cmap=gray)
    ax0.set_title("input", fontsize=9)
    ax1.imshow(img.numpy(), cmap=gray)
    im = ax1.imshow(up.numpy(), cmap=cmap, alpha=alpha)
    ax1.set_title(title or "Taylor-CAM", fontsize=9)
    for ax in (ax0, ax1):
        ax.set_axis_off()
    fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
