"""The demo's figure: per example, the image and one attribution heatmap per method (diverging
colormap centred at 0, symmetric limits per heatmap, the digit's outline drawn over it)."""
from __future__ import annotations

from pathlib import Path


def method_grid_figure(examples: list[dict], methods: list[str], path: Path,
                       title: str) -> Path:
    """Write a PNG with one row per example: ``image | attr[m] for m in methods``.

    ``examples``: dicts with ``image [H, W]``, ``attr`` (``{method: [H, W]}``), ``caption``
    (``{method: str}``) and ``index``, ``label``, ``pred``, ``prob``.
    """
    import numpy as np

    from taylor_kernels.plots import new_figure  # (the Agg canvas: the caller's backend and
    # pyplot's figures stay as they were; matplotlib.use("Agg") switched the backend)

    rows, cols = len(examples), 1 + len(methods)
    fig = new_figure(figsize=(cols * 2.3, rows * 2.35 + 0.7))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for r, ex in enumerate(examples):
        img = np.asarray(ex["image"])
        axes[r, 0].imshow(img, cmap="gray_r", vmin=0, vmax=1)
        wrong = "  (wrong)" if ex["label"] != ex["pred"] else ""
        axes[r, 0].set_title(f"test #{ex['index']}: label {ex['label']}\n"
                             f"pred {ex['pred']} (p={ex['prob']:.2f}){wrong}", fontsize=8)
        for c, m in enumerate(methods, start=1):
            attr = np.asarray(ex["attr"][m])
            lim = float(np.abs(attr).max()) or 1.0
            im = axes[r, c].imshow(attr, cmap="RdBu_r", vmin=-lim, vmax=lim)
            if img.max() > img.min():
                axes[r, c].contour(img, levels=[0.5 * (img.max() + img.min())], colors="0.35",
                                   linewidths=0.6)
            axes[r, c].set_title(f"{m}\n{ex['caption'][m]}", fontsize=7)
            fig.colorbar(im, ax=axes[r, c], fraction=0.046, pad=0.03).ax.tick_params(
                labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, "red = pushes towards the predicted class, blue = against (scale "
             "symmetric per heatmap; grey line = the digit's outline); gap = sum(attr) - "
             "(f(x) - E f(baseline))", ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
