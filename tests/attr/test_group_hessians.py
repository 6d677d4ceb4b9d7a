"""Group Integrated Hessians: equal to the dense Integrated Hessians summed over the groups,
complete per group, and on a transformer's token embeddings (MiniLM, when installed)."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.attr.group_hessians import group_integrated_hessians


def _mlp(d=6):
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3),
                               torch.nn.GELU()).double()


@pytest.mark.parametrize("K", [1, 2])
def test_equals_dense_integrated_hessians_summed_over_groups(K):
    model = _mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    bl = 0.3 * torch.randn(3, K, 6, dtype=torch.float64) if K > 1 else None
    mask = torch.tensor([0, 0, 1, 2, 2, 2])
    dense = tk.integrated_hessians(model, x, bl, target=1, steps=8).interactions
    onehot = torch.nn.functional.one_hot(mask, 3).double()             # [D, G]
    want = onehot.T @ dense @ onehot
    got = group_integrated_hessians(model, x, mask, bl, target=1, steps=8)
    torch.testing.assert_close(got.interactions, want, rtol=1e-10, atol=1e-12)
    assert got.completeness_gap.max() < 1e-9
    torch.testing.assert_close(got.interactions, got.interactions.transpose(1, 2),
                               rtol=1e-10, atol=1e-12)


def test_float32_model():
    model, x = _mlp().float(), torch.randn(2, 6)
    res = group_integrated_hessians(model, x, torch.tensor([0, 0, 1, 1, 2, 2]), target=2)
    assert res.interactions.dtype == torch.float32 and res.completeness_gap.max() < 1e-4


def test_small_budget_gives_the_same_result():
    model, x = _mlp(), torch.randn(4, 6, dtype=torch.float64)
    mask = torch.tensor([0, 1, 2, 3, 4, 5])
    whole = group_integrated_hessians(model, x, mask, target=0, steps=4)
    small = group_integrated_hessians(model, x, mask, target=0, steps=4, max_memory="8KB")
    torch.testing.assert_close(small.interactions, whole.interactions, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk", [1, 2, 5, 9])
def test_chunk_size_splits_points_or_groups_without_changing_the_result(chunk):
    model, x = _mlp(), torch.randn(3, 6, dtype=torch.float64)
    mask = torch.tensor([0, 0, 1, 2, 2, 2])
    whole = group_integrated_hessians(model, x, mask, target=0, steps=4, chunk_size=10_000)
    part = group_integrated_hessians(model, x, mask, target=0, steps=4, chunk_size=chunk)
    torch.testing.assert_close(part.interactions, whole.interactions, rtol=1e-12, atol=1e-13)
    assert part.evaluations == whole.evaluations


def test_minilm_token_interactions():
    minilm = pytest.importorskip("taylor_kernels.demo.minilm")
    try:
        model, tok = minilm.load(dtype=torch.float64)
    except ImportError as exc:
        pytest.skip(str(exc))
    coarse = minilm.token_interactions(model, tok, "a cat sat", "a dog sits", steps=8)
    res = minilm.token_interactions(model, tok, "a cat sat", "a dog sits", steps=32)
    L = len(res["tokens"])
    assert res["interactions"].shape == (L, L) and L == 5  # [CLS] a cat sat [SEP]
    # the path from [PAD] embeddings is far from polynomial: completeness converges with the
    # quadrature (measured: 0.47, 0.035, 1.1e-3, 4.9e-5 at 4, 16, 32, 64 nodes)
    assert res["completeness_gap"] < 1e-2 * res["ig"].abs().sum()
    assert res["completeness_gap"] < coarse["completeness_gap"] / 10
    torch.testing.assert_close(res["interactions"], res["interactions"].T, rtol=1e-9, atol=1e-12)


def test_the_separate_ig_runs_before_the_pairs(monkeypatch):
    """Its chunks fit the budget with no [B, G, G] result beside them."""
    from taylor_kernels.engine import path_engine
    order = []
    real_integrate, real_stream = path_engine.integrate, path_engine.stream_pairs
    monkeypatch.setattr(path_engine, "integrate", lambda *a, **kw: order.append("ig")
                        or real_integrate(*a, **kw))
    monkeypatch.setattr(path_engine, "stream_pairs", lambda *a, **kw: order.append("pairs")
                        or real_stream(*a, **kw))
    x = torch.randn(2, 6, dtype=torch.float64)
    group_integrated_hessians(_mlp(), x, torch.tensor([0, 0, 1, 1, 2, 2]), target=0, steps=4,
                              max_memory="1MB")
    assert order == ["ig", "pairs"]


def test_a_too_small_budget_is_refused_before_the_group_indicators_are_made():
    """``[G, D]`` indicators of 4096 one-feature groups take 64 MB (an int64 one-hot of them
    128 MB more): a 1 MB budget raises ``MemoryError`` before any of it is allocated."""
    import pathlib
    hwm, clear = pathlib.Path("/proc/self/status"), pathlib.Path("/proc/self/clear_refs")
    if not clear.exists():
        pytest.skip("needs Linux /proc to read the resident peak")

    def peak_kib():
        return next(int(line.split()[1]) for line in hwm.read_text().splitlines()
                    if line.startswith("VmHWM:"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4096, 2), torch.nn.Tanh(),
                                torch.nn.Linear(2, 1))
    x = torch.randn(1, 4096)
    clear.write_text("5")
    before = peak_kib()
    with pytest.raises(MemoryError):
        tk.group_integrated_hessians(model, x, torch.arange(4096), target=0,
                                     max_memory="1MB")
    assert peak_kib() - before < 32 * 1024
