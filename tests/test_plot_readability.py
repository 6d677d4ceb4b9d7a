"""Readable figures: the unification-table figure marks n/a principles and tiny departures, colours
cells by their departure from the ideal and creates its folder; the interaction heatmap stays
a bounded size with readable tick labels for many features."""
from __future__ import annotations

import math

import pytest
import torch

from taylor_kernels import plots
from taylor_kernels.attr.unification_table import MethodRow, UnificationTable

pytest.importorskip("matplotlib")


def _table() -> UnificationTable:
    """Four methods: tiny departures, n/a throughout, P1 n/a only, large departures."""
    rows = [MethodRow("exact", 1e-7, 2e-7, 3e-8, 1.0, 1.0, 0.0, 0.1),
            MethodRow("cam", None, None, None, None, None, None, 0.0, "no probe"),
            MethodRow("even", float("nan"), 0.5, 0.25, 1.0, 1.0, 0.0, 0.1, "P1 n/a"),
            MethodRow("rough", 1.2, 1.8, 3.3, 1.9, -1.1, 0.4, 0.1)]
    return UnificationTable(rows, 0.2, 0.01, 3, 3, 8, 0.9)


def test_unification_plot_marks_na_and_shows_tiny_departures():
    """A None principle drew a 0-length bar (read as '0 = satisfied') and a 1e-7 departure was
    invisible below the fixed symlog threshold 1e-3."""
    bars = _table().plot().axes[0]
    assert len(bars.patches) == 12 - 4  # one bar per finite departure, none for the 4 n/a
    na = [t for t in bars.texts if t.get_text() == "n/a"]
    assert len(na) == 4 and all(t.xy[0] == 0 for t in na)
    assert sorted(round(t.xy[1], 2) for t in na) == [0.73, 1.0, 1.27, 1.73]  # cam's 3, even's P1
    assert "1e-07" in [t.get_text() for t in bars.texts]
    assert bars.get_xaxis().get_transform().linthresh <= 1e-8  # 3e-8 on the log part
    tiny = min(bars.patches, key=lambda p: p.get_width())  # the 3e-8 bar
    x0, x1 = bars.transData.transform([(0, 0), (tiny.get_width(), 0)])[:, 0]
    assert x1 - x0 > 20  # pixels


def test_unification_heatmap_colours_the_departure_from_the_ideal():
    """One coolwarm scale over min..max of p-columns (ideal 0) and share columns (ideal 1): a
    perfect method had two colours, and white sat at the mean, not at the ideal."""
    fig = _table().plot()
    heat, bar = fig.axes[1], fig.axes[2]
    im = heat.get_images()[0]
    rgba = im.to_rgba(im.get_array())
    assert im.norm.vmin == 0 and im.norm(0.0) == 0
    assert (rgba[0] == rgba[0, 0]).all()  # 'exact': every column at its ideal, one colour
    assert tuple(rgba[0, 0]) == pytest.approx(im.cmap(0.0))
    assert tuple(rgba[1, 0]) == pytest.approx((0.827, 0.827, 0.827, 1.0), abs=1e-3)  # n/a
    assert im.get_array()[3, 4] == pytest.approx(2.1)  # |-1.1 - 1|
    assert im.get_array()[3, 0] == pytest.approx(1.2)  # |1.2 - 0|
    assert "ideal" in bar.get_ylabel()
    texts = [t.get_text() for t in heat.texts]
    assert texts[18:24] == ["1.2", "1.8", "3.3", "1.9", "-1.1", "0.4"]  # signed values kept


def test_unification_plot_creates_missing_folders(tmp_path):
    out = tmp_path / "new" / "sub" / "table.png"
    _table().plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interaction_heatmap_caps_the_size_and_thins_labels_for_many_features():
    """n = 200 made a 91 x 91 in figure (10k px PNG, 4 GB RSS) with 200 unreadable labels."""
    n = 200
    fig = plots.interaction_heatmap(torch.rand(n, n), [f"t{i}" for i in range(n)])
    assert max(fig.get_size_inches()) <= 16
    ax = fig.axes[0]
    step = math.ceil(n / 60)  # at most 60 labels per axis
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"t{i}" for i in range(0, n, step)]
    assert list(ax.get_yticks()) == list(range(0, n, step))


@pytest.mark.parametrize("n, size", [(4, (3.0, 2.7)), (30, (14.7, 14.4))])
def test_interaction_heatmap_keeps_small_figures_as_they_were(n, size):
    fig = plots.interaction_heatmap(torch.rand(n, n))
    assert tuple(fig.get_size_inches()) == pytest.approx(size)
    assert len(fig.axes[0].get_xticklabels()) == n
