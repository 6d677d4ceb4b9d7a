"""Plots: each writes a PNG and has the expected axes; bad inputs raise."""
from __future__ import annotations

import pytest
import torch

from taylor_kernels import plots


def test_interaction_heatmap_writes_png(tmp_path):
    H = torch.tensor([[0.0, 1.0, 0.2, 0.0], [1.0, 3.0, 0.0, 0.5], [0.2, 0.0, 0.0, 0.1],
                      [0.0, 0.5, 0.1, 0.0]])
    out = tmp_path / "sub" / "heat.png"
    fig = plots.interaction_heatmap(H, labels=list("abcd"), title="pairs", path=out)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list("abcd")
    shown = fig.axes[0].images[0].get_array()
    assert shown[0, 1] == pytest.approx(1.0) and shown.mask[2, 2]  # diagonal blanked



def test_taylor_cam_overlay_writes_png(tmp_path):
    out = tmp_path / "cam.png"
    fig = plots.taylor_cam_overlay(torch.rand(3, 16, 16), torch.rand(4, 4), path=out)
    assert out.exists() and out.stat().st_size > 1000
    assert len(fig.axes) == 3
    assert fig.axes[1].images[1].get_array().shape == (16, 16)  # upsampled to the image
    fig2 = plots.taylor_cam_overlay(torch.rand(8, 8), torch.rand(2, 2))
    assert len(fig2.axes) == 3


@pytest.mark.parametrize("call, match", [
    (lambda: plots.interaction_heatmap(torch.rand(3, 4)), "square"),
    (lambda: plots.interaction_heatmap(torch.rand(0, 0)), "non-empty"),
    (lambda: plots.interaction_heatmap(torch.rand(3)), "dimensions"),
    (lambda: plots.interaction_heatmap(torch.rand(3, 3), labels=["a"]), "labels"),
    (lambda: plots.taylor_cam_overlay(torch.rand(2, 8, 8), torch.rand(2, 2)), "C = 1 or 3"),
    (lambda: plots.taylor_cam_overlay(torch.rand(8, 8), torch.rand(2, 2), alpha=2), "alpha"),
    (lambda: plots.taylor_cam_overlay(torch.rand(8, 8), torch.rand(0, 2)), "cam must be non-empty"),
    (lambda: plots.taylor_cam_overlay(torch.rand(0, 8), torch.rand(2, 2)), "image must be non-empty"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_one_nan_pixel_does_not_blank_the_image():
    """``img.min()`` was NaN: the whole displayed image became zeros."""
    img = torch.rand(8, 8)
    img[0, 0] = float("nan")
    shown = plots.taylor_cam_overlay(img, torch.rand(2, 2)).axes[0].images[0].get_array()
    assert float(shown.max()) == pytest.approx(1.0) and shown[0, 0] == 0


def test_the_demo_figures_leave_the_callers_backend(tmp_path):
    """The demo's figure helpers called matplotlib.use('Agg'): an importing caller's backend
    (here svg) was switched for the rest of its process."""
    matplotlib = pytest.importorskip("matplotlib")
    import numpy as np

    from taylor_kernels.demo.minilm import draw_heatmap
    from taylor_kernels.demo.plots import method_grid_figure
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        draw_heatmap({"tokens_a": ["a", "cat"], "tokens_b": ["b"], "scores_a": [0.3, -0.1],
                      "scores_b": [-0.2], "similarity": 0.5, "steps": 8}, tmp_path / "m.png")
        ex = {"image": np.eye(4), "attr": {"ig": np.eye(4)}, "caption": {"ig": "gap 0"},
              "index": 0, "label": 1, "pred": 1, "prob": 0.9}
        method_grid_figure([ex], ["ig"], tmp_path / "g.png", "t")
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "m.png").stat().st_size > 0 and (tmp_path / "g.png").exists()
    finally:
        matplotlib.use(before)
