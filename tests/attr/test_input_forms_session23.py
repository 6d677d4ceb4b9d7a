"""Session 23: argument forms the library cannot compute with are refused by name, before any
pass over the data: an empty set of baselines (K = 0); complex baselines, backgrounds,
references and directions (they were cast to real, the imaginary part dropped); sparse,
nested, meta and 8-bit float tensors (torch-internal errors from the finiteness check)."""
from __future__ import annotations

import pytest
import torch

import taylor_kernels as tk
import taylor_kernels.captum as tc
from taylor_kernels import ops
from taylor_kernels.numerics import TensorFormError, check_dense_real
from tests import models

pytestmark = pytest.mark.filterwarnings(  # (torch's notes on its beta/prototype layouts)
    "ignore:Sparse CSR tensor support:UserWarning",
    "ignore:The PyTorch API of nested tensors:UserWarning")

X = torch.randn(2, 10, dtype=torch.float64)
K0 = torch.zeros(2, 0, 10, dtype=torch.float64)  # [B, K = 0, D]
COMPLEX = torch.complex(torch.full_like(X, 0.5), torch.full_like(X, 3.0))


@pytest.fixture
def net():
    return models.mlp()


def _row(net):
    return lambda z: net(z)[:, 1]


@pytest.mark.parametrize("call", [
    lambda m: tk.integrated_gradients(m, X, baselines=K0, target=1),
    lambda m: tk.noise_tunnel(tk.integrated_gradients, m, X, baselines=K0, target=1,
                              nt_samples=2, seed=0),
    lambda m: tk.integrated_hessians(m, X, baselines=K0, target=1, steps=2),
    lambda m: tk.taylor_decomposition(m, X, baselines=K0, target=1, order=2),
    lambda m: tk.shapley_integrated_gradients(m, X, reference=K0, target=1, coalitions=2,
                                              seed=0),
    lambda m: tc.IntegratedGradients(m).attribute(X, baselines=K0, target=1),
    lambda m: tk.integrated_gradients(m, X, baselines=torch.zeros(1, 0, 10, dtype=X.dtype),
                                      target=1),
], ids=["ig", "noise_tunnel", "integrated_hessians", "taylor_decomposition", "sig",
        "captum_front_ig", "ig_shared_rows"])
def test_empty_baseline_set_is_refused(net, call):
    with pytest.raises(ValueError, match=r"holds no baselines \(K = 0"):
        call(net)


@pytest.mark.parametrize("call, name", [
    (lambda m: tk.integrated_gradients(m, X, baselines=COMPLEX, target=1), "baseline 0"),
    (lambda m: tk.integrated_hessians(m, X, baselines=COMPLEX, target=1, steps=2),
     "baseline 0"),
    (lambda m: tk.expected_gradients(m, X, COMPLEX, target=1, samples=4, seed=0),
     "background 0"),
    (lambda m: tk.shapley_integrated_gradients(m, X, reference=COMPLEX, target=1,
                                               coalitions=2, seed=0), "baseline 0"),
    (lambda m: tc.IntegratedGradients(m).attribute(X, baselines=COMPLEX, target=1),
     "baseline 0"),
    (lambda m: tc.IntegratedGradients(m, multiply_by_inputs=False).attribute(
        X, baselines=COMPLEX, target=1), "baseline 0"),
    (lambda m: tc.LayerIntegratedGradients(m, m[0]).attribute(X, baselines=COMPLEX, target=1),
     "baseline 0"),
    (lambda m: tc.GradientShap(m).attribute(X, baselines=COMPLEX, target=1), "baseline 0"),
    (lambda m: tk.jet(m, X, COMPLEX, 2, target=1), "directions"),
    (lambda m: tk.hvp(_row(m), X, COMPLEX), "^v"),
    (lambda m: tk.hessian_block(_row(m), X, COMPLEX.unsqueeze(1)), "^U"),
    (lambda m: tk.hessian_block(_row(m), X, X.unsqueeze(1), COMPLEX.unsqueeze(1)), "^W"),
    (lambda m: tk.third_order(_row(m), X, COMPLEX, X), "^u"),
], ids=["ig", "ih", "eg_background", "sig_reference", "captum_front_ig",
        "captum_front_ig_unscaled", "captum_front_lig", "captum_front_gradient_shap", "jet", "hvp",
        "hessian_block_U", "hessian_block_W", "third_order_u"])
def test_complex_references_and_directions_are_refused(net, call, name):
    # (TypeError: a TensorFormError, and the Captum front's CaptumTypeError made of one)
    with pytest.raises(TypeError, match=f"{name} has dtype torch.complex128; only real"):
        call(net)


FORMS = {  # a tensor in the form, and the refusal's wording
    "sparse_coo": (lambda t: t.to_sparse(), r"layout torch.sparse_coo.*\.to_dense\(\)"),
    "sparse_csr": (lambda t: t.to_sparse_csr(), r"layout torch.sparse_csr.*\.to_dense\(\)"),
    "float8": (lambda t: t.to(torch.float8_e4m3fn), r"float8_e4m3fn.*float32 or bfloat16"),
    "meta": (lambda t: t.to("meta"), r"meta device.*real device"),
    "nested": (lambda t: torch.nested.nested_tensor(list(t)), "nested tensor.*padded"),
}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("where", ["input", "baseline"])
def test_unusual_forms_are_refused_up_front(net, form, where):
    make, words = FORMS[form]
    x, bl = (make(X.float()), None) if where == "input" else (X, make(X.float()))
    with pytest.raises(TensorFormError, match=f"{where} 0 (has|is) .*{words}"):
        tk.integrated_gradients(net, x, baselines=bl, target=1)


@pytest.mark.parametrize("form", FORMS)
def test_unusual_forms_are_refused_by_the_derivative_calls(net, form):
    make, words = FORMS[form]
    with pytest.raises(TensorFormError, match=f"^x (has|is) .*{words}"):
        tk.hvp(_row(net), make(X.float()), X)
    with pytest.raises(TensorFormError, match=f"^x (has|is) .*{words}"):
        tk.jet(net, make(X.float()), X, 2, target=1)
    with pytest.raises(TensorFormError, match=f"^directions (has|is) .*{words}"):
        tk.jet(net, X, make(X.float()), 2, target=1)


def test_sparse_background_and_feature_mask_are_refused(net):
    with pytest.raises(TensorFormError, match="background 0 has layout torch.sparse_coo"):
        tk.expected_gradients(net, X, X.to_sparse(), target=1, samples=2, seed=0)
    mask = torch.arange(10).reshape(1, 10).to_sparse()
    with pytest.raises(TensorFormError, match="feature mask 0 has layout torch.sparse_coo"):
        tk.shapley_integrated_gradients(net, X, target=1, feature_mask=mask, coalitions=2,
                                        seed=0)


def test_integer_x_with_floating_directions_is_named(net):
    with pytest.raises(TypeError, match=r"integer inputs carry no direction.*x.to\(torch"):
        tk.jet(net, X.long(), X, 2, target=1)


def test_tensor_form_error_is_a_type_and_a_value_error():
    with pytest.raises(TypeError):
        check_dense_real(X.to_sparse(), "t")
    with pytest.raises(ValueError):
        check_dense_real(X.to_sparse(), "t")


def test_real_baselines_of_other_dtypes_still_pass(net):
    # an integer baseline is cast to the input's dtype, as before
    got = tk.integrated_gradients(net, X, baselines=torch.zeros(10, dtype=torch.long), target=1)
    want = tk.integrated_gradients(net, X, baselines=0.0, target=1)
    torch.testing.assert_close(got.attributions, want.attributions)


@pytest.mark.parametrize("call, name", [
    (lambda s: ops.path_points(s(X), torch.zeros(1, 1, 10, dtype=X.dtype),
                               torch.rand(3, dtype=X.dtype), 0, 6), "x"),
    (lambda s: ops.path_accumulate(torch.randn(6, 10, dtype=X.dtype), X,
                                   s(torch.zeros(1, 1, 10, dtype=X.dtype)),
                                   torch.rand(3, dtype=X.dtype), 0), "baselines"),
    (lambda s: ops.jet_unary("tanh", s(torch.randn(3, 4))), "u"),
    (lambda s: ops.polarize_contract(s(torch.randn(3, 2, 4)), torch.randn(2), 1), "c"),
], ids=["path_points", "path_accumulate", "jet_unary", "polarize_contract"])
def test_raw_ops_refuse_sparse_operands(call, name):
    with pytest.raises(TypeError, match=f"^{name} is of layout torch.sparse_coo; the ops take "
                                        "dense strided tensors"):
        call(lambda t: t.to_sparse())
