"""Process-wide state that threads share: torch's forward-AD levels, the SDPA backend flags,
the warnings filters and tqdm's monitor thread. Calls that overlap in two threads must give
their serial results and leave the process as it was (a QA pass found jvps failing or
returning another thread's tangents, fused attention left off for good, a warnings filter
left behind, and a monitor thread started by disabled progress bars)."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import taylor_kernels as tk
from taylor_kernels import progress
from taylor_kernels.captum_front import _common
from taylor_kernels.engine import derivative, guards

sdpa = pytest.importorskip("torch.nn.attention")


def _flags():
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())


def test_overlapping_math_attention_blocks_restore_the_flags_once_all_are_done():
    """Block A enters, B enters, A leaves first (two threads' calls): math only until B
    leaves, then the flags as they were (nested sdpa_kernel blocks restored each other's
    saved flags and left the fused kernels off)."""
    before = _flags()
    a, b = derivative.math_attention(), derivative.math_attention()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert _flags() == (False, False, True, False)
    b.__exit__(None, None, None)
    assert _flags() == before


def test_overlapping_probes_remove_only_their_own_warnings_filter():
    before = list(warnings.filters)
    a, b = guards._global_hook_warning_ignored(), guards._global_hook_warning_ignored()
    a.__enter__()
    b.__enter__()
    warnings.filterwarnings("ignore", message="another thread's filter")
    mine = warnings.filters[0]
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    try:
        assert warnings.filters == [mine] + before  # theirs kept, ours gone
    finally:
        warnings.filters.remove(mine)


def test_patch_builds_its_twin_quietly_without_touching_the_warnings_filters():
    import taylor_kernels.captum as tkc
    before = list(warnings.filters)
    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _common.for_captum():
            assert _common.constructing_for_captum()
            tkc.LayerIntegratedGradients(lambda x: x, layers)
        assert not _common.constructing_for_captum()
        assert not caught
        tkc.LayerIntegratedGradients(lambda x: x, layers)
        assert len(caught) == 1
    assert warnings.filters == before


def _tanh_mlp(seed: int = 0, width: int = 8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 1)).double().eval()


def test_forward_mode_calls_in_two_threads_give_their_serial_results():
    """torch numbers forward-AD levels per process: nested jvps in two threads (each on its own
    model) failed ("forward AD level with an invalid index") or returned the other thread's
    tangents."""
    fs = [lambda z, m=_tanh_mlp(seed, 64): m(z)[:, 0] for seed in (0, 1)]
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = torch.ones_like(x)
    want = [tk.third_order(f, x, u, x) for f in fs]
    wrong, errors = [], []

    def work(i):
        try:
            for _ in range(25):
                wrong.append(not torch.equal(tk.third_order(fs[i], x, u, x), want[i]))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(wrong) == 50 and not any(wrong)


def test_a_call_without_progress_builds_no_tqdm_bar(monkeypatch):
    """A disabled tqdm bar still starts tqdm's monitor thread (Captum's IG starts none)."""
    built = []
    monkeypatch.setattr(progress, "tqdm", lambda *a, **k: built.append(1))
    model = _tanh_mlp()
    tk.integrated_gradients(model, torch.randn(2, 5, dtype=torch.float64), steps=4)
    assert not built
    assert list(progress.progress_bar(False, [1, 2])) == [1, 2]


def test_a_users_equal_warnings_filter_survives_the_probes():
    warnings.filterwarnings("ignore", message=".*global hooks on modules")
    users = warnings.filters[0]
    try:
        with guards._global_hook_warning_ignored():
            pass
        assert warnings.filters[0] is users
    finally:
        warnings.filters.remove(users)
