"""The demo's figure: per example, the image and its attribution heatmap (diverging colormap
centred at 0, symmetric limits per example)."""
from __future__ import annotations

import math
from pathlib import Path


def heatmap_figure(examples: list[dict], path: Path, title: str, per_row: int = 4) -> Path:
    """Write a PNG of ``examples`` (dicts with ``image [H, W]``, ``attr [H, W]`` and the
    title fields) as ``image | heatmap`` pairs, ``per_row`` pairs per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(examples)
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 2.05, rows * 2.45 + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, ex in enumerate(examples):
        r, c = divmod(i, cols)
        ax_img, ax_att = axes[r, 2 * c], axes[r, 2 * c + 1]
        ax_img.imshow(np.asarray(ex["image"]), cmap="gray_r", vmin=0, vmax=1)
        ok = "" if ex["label"] == ex["pred"] else "  (wrong)"
        ax_img.set_title(f"test #{ex['index']}: label {ex['label']}\n"
                         f"pred {ex['pred']} (p={ex['prob']:.2f}){ok}", fontsize=8)
        attr = np.asarray(ex["attr"])
        lim = float(np.abs(attr).max()) or 1.0
        im = ax_att.imshow(attr, cmap="RdBu_r", vmin=-lim, vmax=lim)
        img = np.asarray(ex["image"])
        if img.max() > img.min():  # the digit's outline, to read the heatmap against
            ax_att.contour(img, levels=[0.5 * (img.max() + img.min())], colors="0.35",
                           linewidths=0.6)
        ax_att.set_title(f"IG GL{ex['steps']} gap {ex['gl_gap']:+.1e}\n"
                         f"adaptive: {ex['ad_evals']} evals, gap {ex['ad_gap']:+.1e}",
                         fontsize=7)
        cb = fig.colorbar(im, ax=ax_att, fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, "heatmap: red = pushes towards the predicted class, blue = against "
             "(colour scale symmetric per example; grey line = the digit's outline); "
             "gap = sum(attr) - (f(x) - f(0))",
             ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
