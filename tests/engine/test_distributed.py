"""Distributed IG: 2 CPU ranks (gloo, spawned) give the single-process result to rounding."""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import taylor_kernels as tk
from taylor_kernels.engine import distributed
from tests.conftest import assert_close_ratio, requires_cuda
from tests.models import mlp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    """Odd sizes: 5 inputs x 3 baselines x 7 nodes = 105 points (not divisible by 2)."""
    model = mlp(d_in=6, hidden=8, d_out=3, seed=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    bl = torch.randn(5, 3, 6, generator=gen, dtype=torch.float64)
    return model, x, bl, torch.tensor([0, 2, 1, 1, 0])


CALLS = {
    "gl": dict(steps=7, chunk_size=4),
    "budget": dict(steps=7, max_memory="64KB"),
    "adaptive": dict(rule="adaptive", tol=1e-8, chunk_size=5),
}


# IH over (point, Hessian row) pairs: chunks of 5 pairs split points of 6 rows across chunks
# and the 2 ranks' blocks; the default budget times candidate chunks.
IH_CALLS = {"ih_pairs": dict(steps=3, ig_steps=5, chunk_size=5),
            "ih_budget": dict(steps=3, ig_steps=5, index=[0, 3, 5])}
GROUPS = torch.tensor([0, 0, 1, 2, 2, 1])


# each rank calls with its own value of one argument (rank 1 differs from rank 0)
MISMATCHES = {
    "steps": lambda r, m, x, bl, t: tk.integrated_gradients(m, x, bl, t, steps=7 + r,
                                                           distributed=True),
    "target": lambda r, m, x, bl, t: tk.integrated_gradients(m, x, bl, (t + r) % 3, steps=5,
                                                            distributed=True),
    "batch": lambda r, m, x, bl, t: tk.integrated_gradients(m, x[:5 - r], bl[:5 - r],
                                                           t[:5 - r], steps=5,
                                                           distributed=True),
    "rule": lambda r, m, x, bl, t: tk.integrated_gradients(
        m, x, bl, t, steps=5, rule=("gausslegendre", "adaptive")[r], distributed=True),
    "reduce_to": lambda r, m, x, bl, t: tk.integrated_gradients(
        m, x, bl, t, steps=5, reduce_to=("all", 0)[r], distributed=True),
    "ih_inputs": lambda r, m, x, bl, t: tk.integrated_hessians(m, x + r, bl, t, steps=3,
                                                              ig_steps=5, distributed=True),
}


def _mismatch_error(call, rank, model, x, bl, t) -> str:
    try:
        call(rank, model, x, bl, t)
    except ValueError as exc:
        return str(exc)
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        model, x, bl, t = _problem()
        res = {}
        for name, kw in CALLS.items():
            r = tk.integrated_gradients(model, x, bl, t, distributed=True, **kw)
            res[name] = (r.attributions, r.gap, r.evaluations)
        r0 = tk.integrated_gradients(model, x, bl, t, steps=7, distributed=True, reduce_to=0)
        res["to0"] = (r0.attributions, r0.gap, r0.evaluations)
        rl = tk.layer_integrated_gradients(model, model[2], x, None, t, steps=5,
                                           distributed=True)
        res["layer"] = (rl.attributions, rl.gap, rl.evaluations)
        for name, kw in IH_CALLS.items():
            ih = tk.integrated_hessians(model, x, bl, t, distributed=True, **kw)
            res[name] = (ih.interactions, ih.ig, ih.evaluations)
        g = tk.group_integrated_hessians(model, x, GROUPS, bl, t, steps=3, ig_steps=5,
                                         chunk_size=4, distributed=True)
        res["group_ih"] = (g.interactions, g.ig, g.evaluations)
        res["mismatch"] = {name: _mismatch_error(call, rank, model, x, bl, t)
                           for name, call in MISMATCHES.items()}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "res")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CALLS))
def test_ranks_match_single_process(ranks, name):
    model, x, bl, t = _problem()
    single = tk.integrated_gradients(model, x, bl, t, **CALLS[name])
    for rank in ranks:
        attr, gap, evaluations = rank[name]
        assert_close_ratio(attr, single.attributions, torch.float64)
        # the gap is a difference of O(1) numbers: compare it on their scale
        scale = single.attributions.abs().sum(1)
        assert ((gap - single.gap).abs() <= 1e-12 * scale).all()
        assert evaluations == single.evaluations


@pytest.mark.parametrize("name", [*IH_CALLS, "group_ih"])
def test_integrated_hessians_ranks_match_single_process(ranks, name):
    model, x, bl, t = _problem()
    if name == "group_ih":
        single = tk.group_integrated_hessians(model, x, GROUPS, bl, t, steps=3, ig_steps=5,
                                              chunk_size=4)
    else:
        single = tk.integrated_hessians(model, x, bl, t, **IH_CALLS[name])
    for rank in ranks:
        inter, ig, evaluations = rank[name]
        assert_close_ratio(inter, single.interactions, torch.float64)
        assert_close_ratio(ig, single.ig, torch.float64)
        assert evaluations == single.evaluations


def test_layer_ig_distributed(ranks):
    model, x, _, t = _problem()
    single = tk.layer_integrated_gradients(model, model[2], x, None, t, steps=5)
    for rank in ranks:
        assert_close_ratio(rank["layer"][0], single.attributions, torch.float64)
        assert rank["layer"][2] == single.evaluations


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_ranks_called_with_other_arguments_all_raise(ranks, name):
    """Other steps or targets on one rank summed each other's partial sums silently (0.02-0.12
    off); another batch size or rule crashed gloo, another reduce_to hung until the timeout."""
    for r in ranks:
        assert "rank(s) [1] of the group were called with other arguments" in \
            r["mismatch"][name], r["mismatch"][name]


def test_reduce_to_rank0(ranks):
    model, x, bl, t = _problem()
    single = tk.integrated_gradients(model, x, bl, t, steps=7)
    assert_close_ratio(ranks[0]["to0"][0], single.attributions, torch.float64)
    # rank 1 keeps only its own shard's partial sum: not the answer
    partial = ranks[1]["to0"][0]
    assert (partial - single.attributions).abs().max() > 1e-6
    # ... whose gap would be f(x) - f(b) minus a part of the sums: NaN there, rank 0's is true
    assert ranks[1]["to0"][1].isnan().all()
    torch.testing.assert_close(ranks[0]["to0"][1], single.gap, atol=1e-12, rtol=0)


@pytest.mark.parametrize("total", [0, 1, 5, 105])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_shards_cover_range(monkeypatch, total, world):
    """Blocks are contiguous, cover [0, total) and differ in size by at most one."""
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group: world)
    blocks = []
    for r in range(world):
        monkeypatch.setattr(distributed.dist, "get_rank", lambda group, r=r: r)
        blocks.append(distributed.shard(total, None))
    assert blocks[0][0] == 0 and blocks[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [hi - lo for lo, hi in blocks]
    assert max(sizes) - min(sizes) <= 1


@requires_cuda
def test_nccl_one_rank_on_gpu():
    """The NCCL path on CUDA tensors (one rank: the collective runs, the result is the
    single-process one)."""
    if not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    model, x, bl, t = _problem()
    model, x, bl = model.cuda(), x.cuda(), bl.cuda()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        res = tk.integrated_gradients(model, x, bl, t, steps=7, distributed=True)
    finally:
        dist.destroy_process_group()
    single = tk.integrated_gradients(model, x, bl, t, steps=7)
    assert_close_ratio(res.attributions, single.attributions, torch.float64)


def test_errors(monkeypatch):
    model, x, bl, t = _problem()
    monkeypatch.setattr(distributed, "resolve_group", lambda d: object())
    with pytest.raises(ValueError, match="create_graph"):
        tk.integrated_gradients(model, x, bl, t, steps=3, distributed=True, create_graph=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="init_process_group"):
        tk.integrated_gradients(model, x, bl, t, steps=3, distributed=True)
    with pytest.raises(ValueError, match="reduce_to"):
        tk.integrated_gradients(model, x, bl, t, steps=3, reduce_to=1)


def test_bench_scale_smoke(tmp_path):
    """The ``scale`` benchmark family runs at smoke size: every row has a positive time, the
    three DAPr steps compute the same loss and MiniLM rows (when the weights are installed)
    agree with Captum."""
    import json

    from taylor_kernels import cli

    out = tmp_path / "scale.json"
    assert cli.main(["bench", "--smoke", "--only", "scale", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["families"]["scale"]["rows"]
    assert {r["case"] for r in rows} == {"minilm", "dapr_step", "distributed"}
    for r in rows:
        assert r.get("median_s", 1) > 0
    assert all(r["loss_diff_vs_ours"] < 1e-5 for r in rows if r["case"] == "dapr_step")
    minilm = [r for r in rows if r["case"] == "minilm" and "error" not in r and not
              r.get("skipped")]
    assert all(r["rel_diff"] < 1e-4 for r in minilm if r["rel_diff"] is not None)
    assert sum(r["rel_diff"] is None for r in minilm) == (1 if minilm else 0)  # Captum's own
    assert [r["processes"] for r in rows if r["case"] == "distributed"] == [1, 2]


def test_example_script_two_ranks():
    """python/distributed_ig.py --spawn 2: both ranks print the same checksum and rank 0 the
    distance to the single-process result."""
    import re

    from tests.test_python_scripts import run_script

    text = run_script("distributed_ig.py", "--spawn", "2", "--batch", "3", "--dim", "8",
                      "--steps", "5")
    sums = set(re.findall(r"checksum (\S+),", text))
    assert len(re.findall(r"rank \d/2:", text)) == 2 and len(sums) == 1, text
    diff = float(re.search(r"single process\| = ([-+.0-9e]+)", text).group(1))
    assert diff < 1e-5
