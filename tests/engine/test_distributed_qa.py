"""Distributed attribution QA (2 CPU ranks, gloo, spawned once): arguments the rank check did
not see, a start level cached per process, one rank's failure, and what ranks other than the
group's rank 0 report (warnings, progress bars)."""
from __future__ import annotations

import dataclasses
import datetime
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import taylor_kernels as tk
from taylor_kernels.engine import derivative, distributed, path_engine
from tests.conftest import assert_close_ratio, requires_cuda
from tests.engine.test_distributed import _free_port
from tests.models import mlp

WORLD = 2
TIMEOUT_S = 30  # the process group's: a rank left waiting for another fails after it


def _model_and_data(B=3):
    model = mlp(d_in=6, hidden=8, d_out=3, seed=1)
    x = torch.randn(B, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return model, x, torch.tensor([0, 2, 1, 1, 0])[:B]


def _error(call) -> str:
    """``call()``'s error as ``"Type: message"`` ("no error" when it returns)."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (what each rank raised is the result)
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _permuted_rows(rank):
    """Rank 1 holds the same rows in another order; rows of 28 features (a multiple of 7)."""
    model = torch.nn.Sequential(torch.nn.Linear(28, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    x = torch.randn(4, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.flip(0) if rank == 1 else x
    return _error(lambda: tk.integrated_gradients(model, x, None, 2, steps=8, distributed=True))


def _ih_index(rank):
    model, x, t = _model_and_data()
    return _error(lambda: tk.integrated_hessians(model, x, None, t, steps=3, ig_steps=4,
                                                 index=[[1, 4], [4, 1]][rank],
                                                 distributed=True))


def _group_mask(rank):
    model, x, t = _model_and_data()
    mask = [torch.tensor([0, 0, 1, 2, 2, 1]), torch.tensor([2, 0, 1, 0, 2, 1])][rank]
    return _error(lambda: tk.group_integrated_hessians(model, x, mask, None, t, steps=3,
                                                       ig_steps=4, distributed=True))


def _list_forward_arg(rank):
    model, x, t = _model_and_data()
    scale = [torch.tensor(1.0 + rank, dtype=torch.float64)]  # a list of tensors
    return _error(lambda: tk.integrated_gradients(lambda z, s: model(z * s[0]), x, None, t,
                                                  steps=6, additional_forward_args=(scale,),
                                                  distributed=True))


def _tiny_gpt2():
    from taylor_kernels.models import tiny

    return tiny.gpt2(layers=1, d=32, heads=2, vocab=64)


def _token_score(rank):
    model = _tiny_gpt2()
    return _error(lambda: tk.token_integrated_gradients(
        model, torch.tensor([[5, 9, 12, 33]]), target=3, steps=4,
        score=("logit", "log_prob")[rank], distributed=True))


def _adaptive_history(rank):
    """Rank 0 alone ran an adaptive call on the model first (its cached start level)."""
    model, x, t = _model_and_data(5)
    if rank == 0:
        tk.integrated_gradients(model, x * 0.5, None, t, rule="adaptive", tol=1e-8)
    return tk.integrated_gradients(model, x, None, t, rule="adaptive", tol=1e-8,
                                   distributed=True).attributions


def _early_failures(rank):
    """Rank 1's own argument check fails before the call's first collective (a target out
    of range, IH's steps=0, token IG's target past the vocabulary); then a good call."""
    model, x, t = _model_and_data()
    bad = rank == 1
    calls = {
        "ig": lambda: tk.integrated_gradients(model, x, None, torch.tensor([0, 2, 7]) if bad
                                              else t, steps=4, distributed=True),
        "ih": lambda: tk.integrated_hessians(model, x, None, t, steps=0 if bad else 3,
                                             ig_steps=4, distributed=True),
        "token": lambda: tk.token_integrated_gradients(
            _tiny_gpt2(), torch.tensor([[5, 9, 12, 33]]), target=99 if bad else 3, steps=4,
            distributed=True)}
    out = {}
    for name, call in calls.items():
        began = time.perf_counter()
        out[name] = (_error(call), time.perf_counter() - began)
    out["after"] = tk.integrated_gradients(model, x, None, t, steps=5,
                                           distributed=True).attributions
    return out


class SqrtNet(torch.nn.Module):
    def forward(self, x):
        return torch.sqrt(x.abs()).sum(1, keepdim=True)


def _non_finite_in_rank1_shard(rank):
    """Input 1's path starts at 0, where the gradient of sqrt|x| is infinite (left Riemann
    nodes): only rank 1's block holds it. Then a good call: the ranks stay in step."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    bl = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)
    began = time.perf_counter()
    error = _error(lambda: tk.integrated_gradients(SqrtNet(), x, bl, 0, steps=4,
                                                   rule="riemann_left", distributed=True))
    seconds = time.perf_counter() - began
    model, xs, t = _model_and_data()
    after = tk.integrated_gradients(model, xs, None, t, steps=5, distributed=True)
    return error, seconds, after.attributions


def _hvp_failure(rank):
    """Rank 1's Hessian-vector products raise (the pair loop of stream_pairs)."""
    model, x, t = _model_and_data()
    began = time.perf_counter()
    with _FailingHvp(rank == 1):
        error = _error(lambda: tk.integrated_hessians(model, x, None, t, steps=3, ig_steps=4,
                                                      chunk_size=4, distributed=True))
    return error, time.perf_counter() - began


class _FailingHvp:
    """While active, ``derivative.grad_and_hvp`` raises ``FloatingPointError``."""

    def __init__(self, active: bool):
        self.active, self.saved = active, derivative.grad_and_hvp

    def __enter__(self):
        if self.active:
            derivative.grad_and_hvp = self._fail

    def __exit__(self, *exc):
        derivative.grad_and_hvp = self.saved

    @staticmethod
    def _fail(*args, **kwargs):
        raise FloatingPointError("injected: non-finite Hessian-vector product")


def _completeness_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in seen if "completeness" in str(w.message)]


def _reduce_to0_warnings(rank):
    model, x, t = _model_and_data(5)
    gpt2 = _tiny_gpt2()
    return {
        "ig": _completeness_warnings(lambda: tk.integrated_gradients(
            model, x, None, t, steps=7, tol=1e-3, distributed=True, reduce_to=0)),
        "token": _completeness_warnings(lambda: tk.token_integrated_gradients(
            gpt2, torch.tensor([[5, 9, 12, 33], [7, 3, 40, 2]]), target=torch.tensor([3, 8]),
            steps=3, distributed=True, reduce_to=0)),
    }


def _progress_bars(rank):
    """The ``enabled`` flag of every progress bar the engine opened on this rank."""
    model, x, t = _model_and_data()
    opened, real = [], path_engine.progress_bar

    def record(enabled, *args, **kwargs):
        opened.append(bool(enabled))
        return real(False, *args, **kwargs)

    path_engine.progress_bar = record
    try:
        tk.integrated_gradients(model, x, None, t, steps=5, distributed=True, progress=True)
        tk.integrated_hessians(model, x, None, t, steps=2, ig_steps=3, distributed=True,
                               progress=True)
    finally:
        path_engine.progress_bar = real
    return opened


def _non_member(rank):
    """``new_group([1])`` gives rank 0 ``GroupMember.NON_GROUP_MEMBER``."""
    group = dist.new_group([1])
    model, x, t = _model_and_data()
    return _error(lambda: tk.integrated_gradients(model, x, None, t, steps=5,
                                                  distributed=group))


def _row_coupling(rank):
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                             torch.nn.Linear(8, 3)).double().train()
    _, x, t = _model_and_data()
    with tk.allow_row_coupling(bn), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tk.integrated_gradients(bn, x, None, t, steps=6, distributed=True)
    return [str(w.message) for w in seen if "allow_row_coupling" in str(w.message)]


# the failures last: a rank left behind by one (before the fix) mismatches what follows
CASES = {"permuted_rows": _permuted_rows, "ih_index": _ih_index, "group_mask": _group_mask,
         "list_forward_arg": _list_forward_arg, "token_score": _token_score,
         "adaptive_history": _adaptive_history, "reduce_to0": _reduce_to0_warnings,
         "progress": _progress_bars, "non_member": _non_member, "row_coupling": _row_coupling,
         "non_finite": _non_finite_in_rank1_shard, "hvp_failure": _hvp_failure,
         "early_failures": _early_failures}


def _case_result(case, rank):
    """``case(rank)``, or what it raised unexpectedly (one case's failure is its test's, not
    every test's)."""
    try:
        return case(rank)
    except Exception as exc:  # noqa: BLE001
        return f"case raised {type(exc).__name__}: {exc}"


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        torch.save({name: _case_result(case, rank) for name, case in CASES.items()},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    out = str(tmp_path_factory.mktemp("dist_qa") / "res")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


OTHER_ARGUMENTS = "rank(s) [1] of the group were called with other arguments"


def test_same_rows_in_another_order_are_refused(ranks):
    """Position weights ``i % 7`` let rows of 28 features in another order pass the check;
    the ranks summed partial sums of different inputs (0.45 off)."""
    for r in ranks:
        assert OTHER_ARGUMENTS in r["permuted_rows"], r["permuted_rows"]


@pytest.mark.parametrize("name", ["ih_index", "group_mask", "list_forward_arg", "token_score"])
def test_arguments_outside_the_engine_are_checked(ranks, name):
    """IH's ``index``, group IH's ``feature_mask``, a list of tensors among the forward args
    and token IG's ``score`` differing on rank 1 returned wrong sums silently."""
    for r in ranks:
        assert OTHER_ARGUMENTS in r[name], r[name]


def test_adaptive_start_level_is_agreed(ranks):
    """Rank 0's cached start level (from a call of its own) made it pass other nodes: every
    rank was told its arguments differ."""
    model, x, t = _model_and_data(5)
    single = tk.integrated_gradients(model, x, None, t, rule="adaptive", tol=1e-8)
    for r in ranks:
        assert isinstance(r["adaptive_history"], torch.Tensor), r["adaptive_history"]
        assert_close_ratio(r["adaptive_history"], single.attributions, torch.float64)


@pytest.mark.parametrize("name", ["non_finite", "hvp_failure"])
def test_one_rank_failure_is_agreed(ranks, name):
    """One rank's error inside its chunk loop left the other waiting in the all-reduce until
    the process group's timeout: now the failing rank raises its error and the other a
    RuntimeError naming it, at once (and the next call runs on both)."""
    (error0, seconds0, *_), (error1, seconds1, *_) = ranks[0][name], ranks[1][name]
    assert error1.startswith("FloatingPointError"), error1
    assert error0.startswith("RuntimeError") and "rank(s) [1]" in error0, error0
    assert max(seconds0, seconds1) < TIMEOUT_S / 2


@pytest.mark.parametrize("name", ["ig", "ih", "token"])
def test_one_rank_failing_its_argument_checks_is_agreed(ranks, name):
    """Rank 1's argument check failed before the call's first collective and rank 0 waited
    in that collective until the process group's timeout: now rank 1 raises its own error
    and rank 0 a RuntimeError naming it, at once."""
    (error0, seconds0), (error1, seconds1) = (r["early_failures"][name] for r in ranks)
    assert error1.split(":")[0].endswith("Error") and "rank(s)" not in error1, error1
    assert error0.startswith("RuntimeError") and "rank(s) [1]" in error0 and \
        "before the call's first collective" in error0, error0
    assert max(seconds0, seconds1) < TIMEOUT_S / 2
    single = tk.integrated_gradients(*_model_and_data()[:2], None, _model_and_data()[2],
                                     steps=5).attributions
    for r in ranks:
        assert_close_ratio(r["early_failures"]["after"], single, torch.float64)


def test_ranks_stay_in_step_after_a_failure(ranks):
    model, x, t = _model_and_data()
    single = tk.integrated_gradients(model, x, None, t, steps=5)
    for r in ranks:
        assert_close_ratio(r["non_finite"][2], single.attributions, torch.float64)


def test_no_completeness_warnings_off_rank0_with_reduce_to0(ranks):
    """Rank 1 holds partial sums (documented): its 'gap' is no sign of convergence."""
    assert ranks[1]["reduce_to0"] == {"ig": [], "token": []}


def test_progress_bar_on_rank0_only(ranks):
    assert ranks[0]["progress"] and all(ranks[0]["progress"])
    assert ranks[1]["progress"] and not any(ranks[1]["progress"])


def test_rank_outside_the_group_is_told_so(ranks):
    assert ranks[0]["non_member"].startswith("ValueError") and \
        "this rank is not in that process group" in ranks[0]["non_member"], \
        ranks[0]["non_member"]
    assert ranks[1]["non_member"] == "no error"


def test_row_coupling_with_distributed_warns_once(ranks):
    for r in ranks:
        assert len(r["row_coupling"]) == 1, r["row_coupling"]


def _differ(a, b) -> bool:
    """What :func:`distributed.check_same_call` refuses for fingerprints ``a`` and ``b``."""
    return bool(a[0] != b[0]) or not torch.allclose(a[1:], b[1:], rtol=1e-9, atol=0)


def test_fingerprint_sees_row_order():
    x = torch.randn(4, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _differ(distributed.fingerprint((x,)), distributed.fingerprint((x.flip(0),)))
    col = x[:, :4].reshape(-1, 1)
    swapped = col.clone()
    swapped[[0, 7]] = col[[7, 0]]  # rows i and i + 7
    assert _differ(distributed.fingerprint((col,)), distributed.fingerprint((swapped,)))
    assert not _differ(distributed.fingerprint((x,)), distributed.fingerprint((x.clone(),)))


@dataclasses.dataclass
class _Args:
    scale: torch.Tensor
    name: str = "a"


@pytest.mark.parametrize("wrap", [lambda v: [v], lambda v: {"s": (v,)}, lambda v: _Args(v)],
                         ids=["list", "dict", "dataclass"])
def test_fingerprint_sees_nested_tensors(wrap):
    """A forward arg holding tensors (inside the engine's ``[target, *forward_args]``) was
    fingerprinted by its type alone."""
    def call(value):
        return distributed.fingerprint((torch.zeros(2), ["target", wrap(value)]))

    one, two = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])
    assert _differ(call(one), call(two))
    assert not _differ(call(one), call(one.clone()))


def test_position_weights_are_integers_scaled():
    """Weights in [1, 2) from 32-bit integers: the same bits on every device."""
    w = distributed._position_weights(10_000, 3, torch.device("cpu"))
    assert float(w.min()) >= 1 and float(w.max()) < 2
    assert torch.equal((w - 1) * 2 ** 32, ((w - 1) * 2 ** 32).round())
    assert len(torch.unique(w)) == w.numel()


@requires_cuda
def test_position_weights_same_on_cuda():
    """Ranks on GPUs and CPUs compare the same weights, bit for bit."""
    cpu = distributed._position_weights(100_000, 2, torch.device("cpu"))
    assert torch.equal(distributed._position_weights(100_000, 2, torch.device("cuda")).cpu(),
                       cpu)


def test_non_group_member_value_is_named():
    with pytest.raises(ValueError, match="this rank is not in that process group"):
        distributed.resolve_group(dist.GroupMember.NON_GROUP_MEMBER)
