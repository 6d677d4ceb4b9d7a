"""pytest-benchmark: ``tk.jet`` vs nested ``torch.func.jvp`` on the family ``jet`` models, and the
fused ``jet_unary`` kernel vs the eager PyTorch recurrence (same cases as the runner)."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.benchmarks import cases_jet
from taylor_kernels.reference import jet as ref


def _model_case(tier: str, which: int):
    cases = cases_jet.MODELS[tier]
    if which >= len(cases):
        pytest.skip("tier has fewer model cases")
    return cases[which]


@pytest.mark.parametrize("method", ["tk.jet", "nested jvp"])
@pytest.mark.parametrize("K", [2, 4, 6])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_directional(benchmark, tier, device, which, K, method):
    if K not in cases_jet.ORDERS[tier]:
        pytest.skip(f"order {K} not in tier {tier}")
    name, spec, B, M = _model_case(tier, which)
    model, shape = cases_jet.build(spec, device)
    x = torch.randn((B,) + shape, device=device)
    V = torch.randn((B, M) + shape, device=device)
    curve = torch.stack([x.unsqueeze(1).expand(V.shape).reshape((B * M,) + shape),
                         V.reshape((B * M,) + shape)])

    def ours():
        with torch.no_grad():
            return tk.jet(model, x, V, K, target=0)

    baseline = cases_jet.for_nested_jvp(model)

    def nested():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return ref.nested_jvp_coefficients(lambda z: baseline(z)[:, 0], [curve], K)

    benchmark.group = f"jet:{name}:K{K}"
    benchmark.extra_info.update({"B": B, "M": M, "K": K})
    benchmark.pedantic(ours if method == "tk.jet" else nested,
                       rounds=cases_jet.REPEATS[tier], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("variant", ["cpp", "eager"])
@pytest.mark.parametrize("fn", cases_jet.UNARY_FNS)
@pytest.mark.parametrize("K", [2, 4, 6])
def test_jet_unary(benchmark, tier, K, fn, variant):
    if K not in cases_jet.ORDERS[tier]:
        pytest.skip(f"order {K} not in tier {tier}")
    if variant == "cpp" and not tk.backends.available()["cpp"]:
        pytest.skip("extension not built")
    N = cases_jet.UNARY_N[tier]
    u = torch.randn(K + 1, N) * 0.5
    code = ref.fn_code(fn)
    fn_ = ((lambda: torch.ops.taylor_kernels.jet_unary(u, code)) if variant == "cpp"
           else (lambda: ref.jet_unary(fn, u)))
    benchmark.group = f"jet_unary:{fn}:K{K}"
    benchmark.extra_info.update({"N": N, "bytes": 2 * (K + 1) * N * 4,
                                 "flops": cases_jet.unary_flops(fn, K) * N})
    benchmark.pedantic(fn_, rounds=cases_jet.REPEATS[tier], warmup_rounds=1, iterations=1)
