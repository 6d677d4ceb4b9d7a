"""Progress bars of the long-running APIs (a UX QA pass): ``progress=True`` draws one bar that
reaches its total (also when the work is chunked) and is closed, also when the call raises;
``progress=False`` draws nothing; the adaptive rule draws one bar for the whole call;
``import taylor_kernels`` works without tqdm; a ``progress`` that is not a bool is refused."""
from __future__ import annotations

import importlib
import io
import subprocess
import sys

import pytest
import torch
import tqdm.auto
from torch import nn

import taylor_kernels as tk
import taylor_kernels.priors as priors
from taylor_kernels.progress import progress_bar

deriv_mod, jet_mod = (importlib.import_module(f"taylor_kernels.engine.{name}")
                      for name in ("derivative", "jet"))
# the modules (``taylor_kernels.attr`` exports some functions under their module's name)
ig_mod, inter_mod, cam_mod, td_mod, unif_mod, table_mod = (
    importlib.import_module(f"taylor_kernels.attr.{name}") for name in (
        "integrated_gradients", "interactions", "taylor_cam", "taylor_decomposition",
        "unification", "unification_table"))


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar the library draws (into a buffer), with its closing and updates."""
    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            self.was_closed, self.updates = False, 0
            super().__init__(*args, file=io.StringIO(), **kwargs)
            made.append(self)

        def update(self, n=1):
            self.updates += 1
            return super().update(n)

        def close(self):
            self.was_closed = True
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    return made


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).double().eval()


def _x(*shape):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _fit(progress, epochs=3, patience=5):
    torch.manual_seed(0)
    X = _x(24, 4).float()
    y = (X[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    return priors.fit(model, (X, y), (X, y), prior_net=priors.PriorNet(),
                      meta=priors.feature_metadata(X), lam=0.1, epochs=epochs, batch_size=12,
                      patience=patience, progress=progress)


def _cam(progress):
    model = _cnn()
    return tk.taylor_cam(model, model[0], _x(2, 1, 3, 3), target=0, progress=progress)


def _no_grad_jet(progress):
    """A jet in several passes (a small budget; no graph kept under no_grad)."""
    with torch.no_grad():
        return tk.jet(_mlp(), _x(3, 4), _x(3, 64, 4), 3, target=0, max_memory="60KB",
                      progress=progress)


CALLS = {  # name: (call(progress), (module, function) whose failure is injected)
    "taylor_cam": (_cam, (cam_mod, "hessian_block")),
    "fourteen_methods": (lambda p: tk.fourteen_methods(_cnn(), _x(1, 1, 3, 3), target=0,
                                                       progress=p), (unif_mod, "run_method")),
    "taylor_decomposition": (lambda p: tk.taylor_decomposition(_mlp(), _x(2, 4), target=0,
                                                               progress=p),
                             (td_mod, "_pair_terms")),
    "interactions pairs": (lambda p: tk.interactions(_mlp(), _x(2, 4), target=0, progress=p),
                           (inter_mod, "hessian")),
    "interactions sets": (lambda p: tk.interactions(_mlp(), _x(2, 4), target=0, order=3,
                                                    progress=p), (inter_mod, "_nested_jvp")),
    "greedy_interaction_sets": (lambda p: tk.greedy_interaction_sets(
        _mlp(), _x(2, 4), target=0, beam=2, progress=p), (inter_mod, "_nested_jvp")),
    "global_interactions": (lambda p: tk.global_interactions(
        _mlp(), _x(10, 4), target=0, order=3, batch_size=4, progress=p),
        (inter_mod, "_nested_jvp")),
    "priors.fit": (_fit, (priors, "accuracy")),
    "hessian": (lambda p: tk.hessian(lambda z: _mlp()(z)[:, 0], _x(3, 4), chunk_size=5,
                                     progress=p), (deriv_mod, "grad_and_hvp")),
    "hessian_diagonal": (lambda p: tk.hessian_diagonal(lambda z: _mlp()(z)[:, 0], _x(3, 4),
                                                       method="hutchinson", samples=6,
                                                       chunk_size=4, progress=p),
                         (deriv_mod, "grad_and_hvp")),
    "hvp": (lambda p: tk.hvp(lambda z: _mlp()(z)[:, 0], _x(3, 4), _x(3, 2, 4), progress=p),
            (deriv_mod, "grad_and_hvp")),
    "jet": (lambda p: _no_grad_jet(p), (jet_mod, "_jet_pass")),
    "mixed_partials": (lambda p: tk.mixed_partials(_mlp(), _x(3, 4), [(0, 1), (1, 2, 3), (2,)],
                                                   target=0, progress=p),
                       (jet_mod, "_jet_pass")),
    "unification_table": (lambda p: tk.unification_table(_mlp(), _x(1, 4), target=0,
                                                         progress=p),
                          (table_mod, "run_method")),
    "adaptive IG": (lambda p: tk.integrated_gradients(_mlp(), _x(3, 4), target=0,
                                                      rule="adaptive", tol=1e-10, progress=p),
                    (ig_mod, "_converged")),
}


def _finished(bar) -> bool:
    return bar.was_closed and bar.total and bar.n == bar.total


@pytest.mark.parametrize("name", CALLS)
def test_a_long_call_draws_one_bar_that_reaches_its_total(name, bars):
    CALLS[name][0](True)
    assert len(bars) == 1
    assert _finished(bars[0]), (bars[0].n, bars[0].total, bars[0].was_closed)


@pytest.mark.parametrize("name", CALLS)
def test_without_progress_nothing_is_drawn(name, bars, capfd):
    CALLS[name][0](False)
    assert not bars
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("name", CALLS)
def test_a_raising_call_leaves_no_open_bar(name, bars, monkeypatch):
    module, function = CALLS[name][1]

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(module, function, fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        CALLS[name][0](True)
    assert len(bars) == 1 and bars[0].was_closed


def test_taylor_cam_counts_its_blocks_of_regions_to_the_total(bars, monkeypatch):
    """Directions go to the engine ``REGION_BLOCK`` regions at a time: 9 regions in blocks
    of 4 are 3 steps per input, and the same cross terms as one block."""
    whole = _cam(False)
    monkeypatch.setattr(cam_mod, "REGION_BLOCK", 4)
    blocked = _cam(True)
    torch.testing.assert_close(blocked.cross, whole.cross, rtol=1e-12, atol=1e-14)
    assert bars[0].total == 2 * 9 and _finished(bars[0]) and bars[0].updates == 2 * 3


def test_interactions_count_every_chunk_of_sets(bars, monkeypatch):
    whole = tk.interactions(_mlp(), _x(2, 4), target=0, order=3).derivatives
    monkeypatch.setattr(inter_mod, "_set_chunk", lambda *args: 1)
    got = tk.interactions(_mlp(), _x(2, 4), target=0, order=3, progress=True).derivatives
    torch.testing.assert_close(got, whole)
    assert bars[0].total == 2 * 4 and _finished(bars[0]) and bars[0].updates == 4


def test_the_adaptive_rule_draws_one_bar_over_all_its_levels(bars):
    """One bar per refinement level, each 'path points' at 100%, told nothing of how far the
    call was: now one bar whose total grows by each level's points, ending at the
    evaluations, the level in its postfix; chunked too."""
    res = tk.integrated_gradients(_mlp(), _x(3, 4), target=0, rule="adaptive", tol=1e-10,
                                  chunk_size=2, progress=True)
    assert len(bars) == 1
    assert _finished(bars[0]) and bars[0].n == res.evaluations
    assert res.evaluations > 3 * 4  # (several levels: 1 + 3 + ... nodes per input)
    assert "level" in bars[0].postfix and "adaptive" in bars[0].desc


def test_an_early_stop_ends_the_fit_bar_at_the_epochs_run(bars):
    res = _fit(True, epochs=50, patience=1)
    assert len(res.history) < 50
    assert bars[0].total == len(res.history) and _finished(bars[0])
    assert "early stop" in bars[0].desc and "ce=" in bars[0].postfix


@pytest.mark.parametrize("value", ["no", 1, None])
def test_a_progress_that_is_not_a_bool_is_refused(value):
    """``progress="no"`` drew a bar."""
    with pytest.raises(TypeError, match="progress must be True or False"):
        tk.integrated_gradients(_mlp(), _x(2, 4), target=0, progress=value)
    with pytest.raises(TypeError, match="progress must be True or False"):
        _cam(value)
    with pytest.raises(TypeError, match="progress must be True or False"):
        progress_bar(value, [1])


def test_the_library_imports_and_runs_without_tqdm():
    """progress.py imported tqdm at module level: ``import taylor_kernels`` failed without
    it, although bars are off by default."""
    code = (
        "import sys\n"
        "sys.modules['tqdm'] = None\n"
        "import torch, taylor_kernels as tk\n"
        "m = torch.nn.Linear(3, 2)\n"
        "tk.integrated_gradients(m, torch.randn(2, 3), target=0, steps=4)\n"
        "try:\n"
        "    tk.integrated_gradients(m, torch.randn(2, 3), target=0, steps=4, progress=True)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pip install tqdm" in proc.stdout


@pytest.mark.parametrize("call, total", [
    # grouped pairs: one Hessian row per group (m = 2), not per feature (D = 4)
    (lambda p: tk.interactions(_mlp(), _x(3, 4), target=0, feature_mask=torch.tensor(
        [[0, 0, 1, 1]]), progress=p), 3 * 2),
    # order 1: no pair terms to count
    (lambda p: tk.taylor_decomposition(_mlp(), _x(2, 4), target=0, order=1, progress=p),
     None),
])
def test_bars_count_the_work_that_runs(call, total, bars):
    call(True)
    assert len(bars) == 1 and _finished(bars[0]), (bars[0].n, bars[0].total)
    if total is not None:
        assert bars[0].total == total
