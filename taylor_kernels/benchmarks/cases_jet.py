"""Family ``jet``: Taylor mode against nested forward-mode AD, and the fused jet kernel.

* ``directional``: the order-K coefficients of ``t -> f(x + t v)`` for ``M`` directions per
  input of a tanh MLP, a GELU MLP and a small pre-norm transformer block (attention + GELU MLP,
  layer norms), by ``tk.jet`` (traced Taylor mode) and by ``torch.func.jvp`` nested K times on
  the same batched function (``reference.jet.nested_jvp_coefficients``), K = 2, 4, 6; with
  the largest difference relative to the largest coefficient of each order.
* ``jet_unary``: the fused C++ kernel (all orders, one pass over memory) against the eager
  PyTorch recurrence (``reference.jet.jet_unary``: one ATen call per term) on ``N`` elements,
  K = 2, 4, 6. ``bytes`` = the ``(K+1) N`` coefficients read plus written once; ``flops`` =
  the recurrence's multiply/add/divide count (:func:`unary_flops`); GB/s = bytes / time.
"""
from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import taylor_kernels as tk
from taylor_kernels.benchmarks.report import error_text, fmt_time, format_table
from taylor_kernels.benchmarks.timing import Timing, measure
from taylor_kernels.reference import jet as ref

ORDERS = {"smoke": (2,), "quick": (2, 4, 6), "full": (2, 4, 6)}
REPEATS = {"smoke": 1, "quick": 9, "full": 11}
# directional cases: (name, model spec, batch B, directions M)
MODELS = {
    "smoke": [("mlp_tanh", {"kind": "mlp", "d": 8, "hidden": 16, "act": "tanh"}, 2, 2)],
    "quick": [("mlp_tanh", {"kind": "mlp", "d": 64, "hidden": 128, "act": "tanh"}, 16, 4),
              ("mlp_gelu", {"kind": "mlp", "d": 64, "hidden": 128, "act": "gelu"}, 16, 4),
              ("block", {"kind": "block", "d": 32, "tokens": 8, "heads": 4}, 8, 4)],
    "full": [("mlp_tanh", {"kind": "mlp", "d": 256, "hidden": 512, "act": "tanh"}, 64, 8),
             ("mlp_gelu", {"kind": "mlp", "d": 256, "hidden": 512, "act": "gelu"}, 64, 8),
             ("block", {"kind": "block", "d": 64, "tokens": 16, "heads": 4}, 32, 8)],
}
UNARY_N = {"smoke": 4096, "quick": 1 << 20, "full": 1 << 23}
UNARY_FNS = ("tanh", "gelu", "exp", "silu")


class Block(nn.Module):
    """Pre-norm transformer block (causal SDPA attention, GELU MLP of width ``mlp_ratio * d``)
    with a classification head (also the test suite's transformer block)."""

    def __init__(self, d: int, heads: int, classes: int = 10, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(),
                                 nn.Linear(mlp_ratio * d, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, T, 3 * self.heads, -1).transpose(1, 2).chunk(
            3, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class CompositeLayerNorm(nn.Module):
    """``nn.LayerNorm`` spelled out (mean, rsqrt of the variance): torch's nested forward-mode AD
    through the fused layer norm is wrong beyond first order (its jvp formula reuses the saved
    mean / rstd), so nested-jvp baselines use this instead."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        c = x - x.mean(-1, keepdim=True)
        y = c * torch.rsqrt((c * c).mean(-1, keepdim=True) + self.ln.eps)
        return y * self.ln.weight + self.ln.bias if self.ln.weight is not None else y


def for_nested_jvp(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.LayerNorm`` replaced by :class:`CompositeLayerNorm`."""
    model = copy.deepcopy(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(model, name, CompositeLayerNorm(child))
        else:
            setattr(model, name, for_nested_jvp(child))
    return model


def build(spec: dict, device) -> tuple[nn.Module, tuple[int, ...]]:
    """Seeded model and its per-input shape."""
    torch.manual_seed(0)
    if spec["kind"] == "mlp":
        act = nn.Tanh if spec["act"] == "tanh" else nn.GELU
        d, h = spec["d"], spec["hidden"]
        model = nn.Sequential(nn.Linear(d, h), act(), nn.Linear(h, h), act(), nn.Linear(h, 10))
        shape = (d,)
    else:
        model = Block(spec["d"], spec["heads"])
        shape = (spec["tokens"], spec["d"])
    return model.to(device).eval(), shape


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over orders k of max|a_k - b_k| / max|b_k|."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).abs().amax(1) / b.abs().amax(1).clamp_min(1e-300)).max().item()


def directional_row(name, spec, B, M, K, device, repeats) -> dict:
    model, shape = build(spec, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((B,) + shape, generator=g).to(device)
    V = torch.randn((B, M) + shape, generator=g).to(device)
    target = 0
    x0 = x.unsqueeze(1).expand(V.shape).reshape((B * M,) + shape)
    curve = torch.stack([x0, V.reshape(x0.shape)])

    def ours():
        with torch.no_grad():
            return tk.jet(model, x, V, K, target=target)

    baseline = for_nested_jvp(model)

    def nested():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return ref.nested_jvp_coefficients(lambda z: baseline(z)[:, target], [curve], K)

    timed = paired(ours, nested, repeats, device)
    t_ours, t_nested = timed["fast"], timed["slow"]
    diff = _rel_diff(ours().reshape(K + 1, -1), nested())
    return {"case": name, "K": K, "B": B, "M": M, "ours_s": t_ours.median,
            "nested_s": t_nested.median, "speedup": timed["speedup"],
            "rel_diff": diff, "ours_time": t_ours.as_dict(), "nested_time": t_nested.as_dict()}


def paired(fast, slow, repeats: int, device=None) -> dict:
    """Time ``fast`` and ``slow`` alternately (one warmup each): on a shared machine the load
    then hits both alike; the speedup is the median of the per-pair ratios."""
    fast_t, slow_t = Timing(), Timing()
    for fn in (fast, slow):
        fn()
    for _ in range(repeats):
        fast_t.times += measure(fast, warmup=0, repeats=1, device=device).times
        slow_t.times += measure(slow, warmup=0, repeats=1, device=device).times
    ratio = statistics.median(s / f for s, f in zip(slow_t.times, fast_t.times))
    return {"fast": fast_t, "slow": slow_t, "speedup": ratio}


def _sum_k(J: int, f) -> int:
    return sum(f(k) for k in range(1, J + 1))


def unary_flops(fn: str, J: int) -> int:
    """Arithmetic operations per element of the recurrence (order-0 functions count 1 each).

    ``D(u, z)_k`` costs ``3k`` (``j * u_j * z_{k-j}`` summed, one divide), a Cauchy term
    ``(a*b)_k`` costs ``2k + 1``.
    """
    integral = lambda k: 3 * k  # noqa: E731
    cauchy = lambda k: 2 * k + 1  # noqa: E731
    sig = lambda J_: 3 + _sum_k(J_, lambda k: integral(k) + cauchy(k) + 1)  # noqa: E731
    if fn == "exp":
        return 1 + _sum_k(J, integral)
    if fn == "tanh":
        return sig(J)
    if fn == "silu":
        return sig(J) + sum(cauchy(k) for k in range(J + 1))
    if fn == "gelu":
        return 8 + _sum_k(J, lambda k: 2 * integral(k) + cauchy(k)) + \
            sum(cauchy(k) for k in range(J + 1))
    raise ValueError(f"no flop count for {fn!r}")


def _fused_row(fn: str, K: int, N: int, fused, eager, exact, nbytes: int, flops: int,
               repeats: int) -> dict:
    """Time ``fused`` (C++ op) against ``eager`` (the reference) in alternation; the error is
    against ``exact`` (the reference in float64)."""
    timed = paired(fused, eager, repeats)
    t_fused, t_eager = timed["fast"], timed["slow"]
    return {"fn": fn, "K": K, "N": N, "dtype": "float32", "bytes": nbytes, "flops": flops,
            "fused_s": t_fused.median, "eager_s": t_eager.median,
            "speedup": timed["speedup"], "fused_gbps": nbytes / t_fused.median / 1e9,
            "fused_gflops": flops / t_fused.median / 1e9,
            "eager_gbps": nbytes / t_eager.median / 1e9,
            "rel_err": _rel_diff(fused().reshape(-1, N), exact().reshape(-1, N)),
            "fused_time": t_fused.as_dict(), "eager_time": t_eager.as_dict()}


def unary_row(fn: str, K: int, N: int, repeats: int) -> dict:
    """``jet_unary(fn)``: reads and writes ``(K+1) N`` coefficients."""
    u = torch.randn(K + 1, N, generator=torch.Generator().manual_seed(2)) * 0.5
    return _fused_row(fn, K, N, lambda: torch.ops.taylor_kernels.jet_unary(u, ref.fn_code(fn)),
                      lambda: ref.jet_unary(fn, u), lambda: ref.jet_unary(fn, u.double()),
                      2 * (K + 1) * N * u.element_size(), unary_flops(fn, K) * N, repeats)


def mul_row(K: int, N: int, repeats: int) -> dict:
    """``jet_mul`` (truncated Cauchy product): reads two, writes one ``(K+1) N`` jet;
    ``sum_k (2k + 1)`` operations per element."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(K + 1, N, generator=g), torch.randn(K + 1, N, generator=g)
    return _fused_row("mul", K, N, lambda: torch.ops.taylor_kernels.jet_mul(a, b),
                      lambda: ref.jet_mul(a, b), lambda: ref.jet_mul(a.double(), b.double()),
                      3 * (K + 1) * N * a.element_size(),
                      sum(2 * k + 1 for k in range(K + 1)) * N, repeats)


def polarize_row(K: int, N: int, repeats: int, M: int = 16) -> dict:
    """``polarize_contract`` over ``M`` directional jets of order ``K``: reads ``M N``, writes
    ``N`` elements; ``2 M`` operations per element."""
    g = torch.Generator().manual_seed(4)
    c, gamma = torch.randn(K + 1, M, N, generator=g), torch.randn(M, dtype=torch.float64)
    op = torch.ops.taylor_kernels.polarize_contract
    return _fused_row(f"polarize (M={M})", K, N, lambda: op(c, gamma, K),
                      lambda: ref.polarize_contract(c, gamma, K),
                      lambda: ref.polarize_contract(c.double(), gamma, K),
                      (M + 1) * N * c.element_size(), 2 * M * N, repeats)


def run(tier: str, device: torch.device, log=print) -> dict:
    repeats = REPEATS[tier] if device.type == "cpu" else min(REPEATS[tier], 5)
    directional, unary = [], []
    for name, spec, B, M in MODELS[tier]:
        for K in ORDERS[tier]:
            try:
                row = directional_row(name, spec, B, M, K, device, repeats)
            except Exception as exc:  # noqa: BLE001
                row = {"case": name, "K": K, "error": error_text(exc, 300)}
            directional.append(row)
            log(f"[jet] {name} K={K}: " + (f"ours {fmt_time(row['ours_s'])}, nested "
                f"{fmt_time(row['nested_s'])}, x{row['speedup']:.1f}" if "error" not in row
                else f"FAILED {row['error']}"))
    # the fused-op rows time the C++ CPU kernels: on a GPU the ops step of bench/gpu_check.py
    # times the CUDA and Triton kernels instead (rows here would be host figures)
    if tk.backends.available()["cpp"] and device.type == "cpu":
        for fn in UNARY_FNS + ("mul", "polarize"):
            for K in ORDERS[tier]:
                row = (mul_row(K, UNARY_N[tier], repeats) if fn == "mul"
                       else polarize_row(K, UNARY_N[tier] // 16, repeats) if fn == "polarize"
                       else unary_row(fn, K, UNARY_N[tier], repeats))
                unary.append(row)
                log(f"[jet] {row['fn']} K={K}: fused {fmt_time(row['fused_s'])}, eager "
                    f"{fmt_time(row['eager_s'])}, x{row['speedup']:.1f}")
    notes = ["times: medians of alternating runs; speedup: median of the per-pair ratios",
             "directional: tk.jet vs torch.func.jvp nested K times on the same batched "
             "function (B*M rows, target logit 0, float32, no_grad; layer norms spelled out "
             "for nested jvp, whose fused layer-norm rule is wrong beyond order 1); rel diff "
             "= max over orders of max|ours - nested| / max|nested|",
             "jet_unary / jet_mul (fn = mul) / polarize_contract: C++ kernel vs the eager "
             "reference (reference.jet), float32; GB/s = 2 (K+1) N * 4 bytes (jet_mul: "
             "3 (K+1) N * 4; polarize: (M+1) N * 4) / median time"]
    return {"directional": directional, "unary": unary, "notes": notes,
            "threads": torch.get_num_threads()}


def tables(result: dict) -> list[str]:
    cols = [("case", "case", ""), ("K", "K", "d"), ("B", "B", "d"), ("M", "M", "d"),
            ("ours_s", "tk.jet", fmt_time), ("nested_s", "nested jvp", fmt_time),
            ("speedup", "speedup", ".1f"), ("rel_diff", "rel diff", ".1e")]
    if any("error" in r for r in result["directional"]):
        cols.append(("error", "error", ""))
    out = [format_table("jet: order-K directional coefficients, tk.jet vs nested jvp",
                        result["directional"], cols, result["notes"][:2])]
    if result["unary"]:
        ucols = [("fn", "fn", ""), ("K", "K", "d"), ("N", "N", "d"),
                 ("fused_s", "fused (cpp)", fmt_time), ("eager_s", "eager", fmt_time),
                 ("speedup", "speedup", ".1f"), ("fused_gbps", "fused GB/s", ".2f"),
                 ("fused_gflops", "fused GFLOP/s", ".2f"), ("eager_gbps", "eager GB/s", ".2f"),
                 ("rel_err", "rel err", ".1e")]
        out.append(format_table(
            "jet: fused jet_unary / jet_mul / polarize_contract vs eager reference",
            result["unary"], ucols, result["notes"][:1] + result["notes"][2:]))
    return out
