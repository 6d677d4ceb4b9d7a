"""The demo's second-order section: Integrated Hessians between 2x2 patches of a digit, and
Taylor-CAM of the first conv layer, for one test image each."""
from __future__ import annotations

from pathlib import Path

import torch


def patch_interactions(gamma: torch.Tensor, size: int = 8, patch: int = 2) -> torch.Tensor:
    """Sum ``Gamma [size^2, size^2]`` (pixel pairs) into ``[P, P]`` patch pairs,
    ``P = (size / patch)^2``: ``G_pq = sum_{i in p, j in q} Gamma_ij``."""
    from taylor_kernels.demo import patch_mask
    groups = patch_mask(size, patch).reshape(-1)
    onehot = torch.nn.functional.one_hot(groups).to(gamma.dtype)  # [size^2, P]
    return onehot.T @ gamma @ onehot


def second_order_section(model, x: torch.Tensor, target: int, out: Path) -> dict:
    """Integrated Hessians (zero baseline) of one image ``x [1, 1, 8, 8]`` between 2x2
    patches, and Taylor-CAM of ``model.c1`` (after ``c2`` the network is elementwise, then
    linear, so cells of ``c2`` do not interact); writes two PNGs, returns a report section."""
    import taylor_kernels as tk
    from taylor_kernels import plots

    ih = tk.integrated_hessians(model, x, target=target, steps=16)
    patches = patch_interactions(ih.interactions[0].detach().double())
    labels = [f"{r},{c}" for r in range(4) for c in range(4)]
    ih_png = out / "digits_integrated_hessians.png"
    plots.interaction_heatmap(patches.abs(), labels, title="|Integrated Hessians| between 2x2 "
                              "patches (row, col)", path=ih_png)
    cam = tk.taylor_cam(model, model.c1, x, target=target)
    cam_png = out / "digits_taylor_cam.png"
    plots.taylor_cam_overlay(x[0, 0], cam.cell_map()[0], title="Taylor-CAM (conv1): per-cell "
                             "interaction", path=cam_png)
    gap = float(ih.completeness_gap[0])
    return {"heading": "Second order: interactions and Taylor-CAM",
            "text": f"One test image, predicted class {target}. Integrated Hessians "
                    f"({ih.evaluations} evaluations; completeness max_i |sum_j Gamma_ij - "
                    f"IG_i| = {gap:.1e}) summed into 2x2 patches; Taylor-CAM of the first "
                    "conv layer (8x8 cells).",
            "figures": [ih_png, cam_png], "ih_completeness_gap": gap}
