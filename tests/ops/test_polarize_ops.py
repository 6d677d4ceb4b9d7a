"""polarize_contract (``sum_m gamma_m c[order, m, :]``, the contraction behind ``polarize``):
every backend against the reference on odd and strided shapes, opcheck, gradcheck, and the
public ``polarize`` through each backend against autograd derivatives."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
from taylor_kernels.reference import jet as ref
from tests.conftest import assert_close_ratio, requires_cuda

SHAPES = [(1, 1, 1), (3, 4, 7), (5, 9, 1031), (7, 2, 33)]  # J+1, M, N


def make(J1, M, N, dtype, strided=False, device="cpu"):
    c = torch.randn(J1, N, M, dtype=dtype, device=device).transpose(1, 2) if strided \
        else torch.randn(J1, M, N, dtype=dtype, device=device)
    return c, torch.randn(M, dtype=torch.float64, device=device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_backend_matches_reference(cpu_backend, shape, dtype, strided):
    c, gamma = make(*shape, dtype, strided)
    for order in {0, shape[0] - 1}:
        got = tk.ops.polarize_contract(c, gamma, order)
        assert got.shape == (shape[2],) and got.dtype == dtype
        want = ref.polarize_contract(c.double(), gamma, order)
        assert_close_ratio(got, want, dtype)


def test_polarize_through_each_backend(cpu_backend):
    """``polarize`` on the selected backend equals the Hessian entry it stands for."""
    x = torch.randn(4, dtype=torch.float64)
    f = lambda z: torch.tanh(z[0] * z[1] + z[2]).sum() * z[3]  # noqa: E731
    weights, _ = tk.ops.polarization_rule((1, 1))
    dirs = weights.double() @ torch.eye(4, dtype=torch.float64)[[0, 2]]
    c = torch.stack([ref.nested_jvp_coefficients(f, [torch.stack([x, v])], 2) for v in dirs], 1)
    H = torch.func.hessian(f)(x)
    torch.testing.assert_close(tk.ops.polarize(c, (1, 1)), H[0, 2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["c_dims", "gamma_len", "order"])
def test_errors(bad):
    c, gamma = make(3, 4, 5, torch.float32)
    args = {"c_dims": (c[0], gamma, 0), "gamma_len": (c, gamma[:3], 0), "order": (c, gamma, 3)}
    with pytest.raises(ValueError):
        tk.ops.polarize_contract(*args[bad])


def _ops():
    found = []
    if tk.backends.available()["cpp"]:
        found.append((torch.ops.taylor_kernels.polarize_contract.default, {}))
    if tk.backends.runs_on("triton", torch.device("cpu")):
        from taylor_kernels.triton import jet  # noqa: F401  (registers the op)
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
        found.append((torch.ops.taylor_kernels.polarize_contract_triton.default,
                      {"test_utils": utils}))
    return found


def test_opcheck_and_gradcheck():
    if not _ops():
        pytest.skip("neither the C++ nor interpreted Triton ops are available here")
    for op, kw in _ops():
        c, gamma = make(3, 4, 6, torch.float64)
        c.requires_grad_(True)
        gamma.requires_grad_(True)
        torch.library.opcheck(op, (c, gamma, 2), **kw)
        assert torch.autograd.gradcheck(lambda a, g: op(a, g, 1), (c, gamma))
        assert torch.autograd.gradgradcheck(lambda a, g: op(a, g, 1), (c, gamma))


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_matches_reference(backend):
    if not tk.backends.runs_on(backend, torch.device("cuda")):
        pytest.skip(f"{backend} not available")
    with tk.backends.using(backend):
        for shape in SHAPES:
            for strided in (False, True):
                c, gamma = make(*shape, torch.float32, strided, device="cuda")
                got = tk.ops.polarize_contract(c, gamma, shape[0] - 1)
                assert_close_ratio(got, ref.polarize_contract(c.double(), gamma, shape[0] - 1),
                                   torch.float32)
