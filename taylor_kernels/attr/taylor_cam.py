"""Taylor-CAM (Lerman et al., ICCV 2021): second-order interactions of conv feature-map cells.

With the layer activation ``A [C, *spatial]`` (cell ``i``, channel ``l``) and the Hessian of the
target output with respect to it, ``H = d^2 y / dA dA``,

    ``M_ij = sum_l A_il sum_k H_(i,l),(j,k)``,
    ``TaylorCAM_ij = M_ij^2 + M_ji^2``.

``M_ij = (A * u_i) . (H u_j)`` with ``u_j`` the indicator of cell ``j`` over all channels, so the
whole ``[S, S]`` matrix (``S`` cells) costs ``S`` Hessian-vector products per input (the
derivative engine's batched HVPs), never the ``(C S)^2`` Hessian. Regions generalise cells:
with region indicators ``u_r`` (all channels of every cell in region ``r``),
``M_rs = (A * u_r) . (H u_s)`` = the formula summed over the cells of ``r`` and ``s``.

A layer followed by a per-cell normalisation that subtracts the mean over channels
(ConvNeXt's LayerNorm after the depthwise conv; found on HF ConvNext) gives an all-zero map:
``y`` does not change when a constant is added to every channel of cell ``j``, so
``sum_k d y / dA_(j,k) = 0`` everywhere, its derivative ``sum_k H_(i,l),(j,k) = 0`` too, and
``M = 0`` exactly. Choose the layer after the norm there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taylor_kernels.attr.layer import _activation, layer_replaced_forward, named_layer
from taylor_kernels.engine import memory
from taylor_kernels.engine.derivative import hessian_block
from taylor_kernels.engine.problem import as_tuple, make_problem
from taylor_kernels.engine.row_args import forward_args
from taylor_kernels.progress import progress_bar
from taylor_kernels.engine.guards import public_call

# regions' directions per engine call while a progress bar is drawn, its step (without one:
# all R in one call): each call checks all R indicators again (finite), 0.1-0.4 s for
# R = 2304 on a 32-channel 48x48 map, 2-core Xeon, 2026-12-03: blocks of 1024 took 3-6%
# longer than one call there, blocks of 256 30%
REGION_BLOCK = 1024


@dataclass
class TaylorCAMResult:
    """``scores [B, R, R]`` = ``TaylorCAM_rs`` (symmetric, >= 0), ``cross [B, R, R]`` = ``M_rs``,
    ``regions [B|1, *spatial]`` the region (cell) id of every spatial position."""

    scores: torch.Tensor
    cross: torch.Tensor
    regions: torch.Tensor

    def cell_map(self, region: int | None = None) -> torch.Tensor:
        """A ``[B, *spatial]`` map for display: each position gets its region's total
        interaction ``sum_{s != r} TaylorCAM_rs`` (``region=None``), or its region's
        interaction with ``region``."""
        if region is None:
            per = self.scores.sum(dim=2) - torch.diagonal(self.scores, dim1=1, dim2=2)
        else:
            if not 0 <= region < self.scores.shape[1]:
                raise ValueError(f"region {region} outside 0..{self.scores.shape[1] - 1}")
            per = self.scores[:, region]
        ids = self.regions.expand(per.shape[0], *self.regions.shape[1:])
        return torch.gather(per, 1, ids.reshape(ids.shape[0], -1)).reshape(ids.shape)


def _region_ids(regions, spatial: tuple[int, ...], B: int, device) -> torch.Tensor:
    """Region ids ``[B|1, *spatial]``: every cell its own region when ``regions`` is None."""
    S = 1
    for s in spatial:
        S *= s
    if regions is None:
        return torch.arange(S, device=device).reshape(1, *spatial)
    if not isinstance(regions, torch.Tensor) or regions.is_floating_point():
        raise ValueError("regions must be an integer tensor of region ids")
    r = regions.to(device)
    if tuple(r.shape) == spatial:
        r = r.unsqueeze(0)
    if tuple(r.shape[1:]) != spatial or r.shape[0] not in (1, B):
        raise ValueError(f"regions of shape {tuple(regions.shape)} must be {spatial} or "
                         f"({B} or 1, *{spatial}), the layer's spatial shape")
    if r.min() < 0:
        raise ValueError("region ids must be >= 0")
    return r.long()


def _check_result_fits(B: int, R: int, x: torch.Tensor, max_memory) -> None:
    """``MemoryError`` before any work when the ``[B, R, R]`` result (twice: cross terms and
    scores) and the ``[R, C*S]`` indicators pass the budget (an id of 10**6 asked the
    allocator for 4 TB)."""
    need = (2 * B * R * R + R * x.shape[1]) * x.element_size()
    budget = memory.parse_budget(max_memory, x.device)
    if need > budget:
        raise MemoryError(f"regions: the largest id, {R - 1}, makes {R} regions, whose "
                          f"[{B}, {R}, {R}] result and indicators take {need / 2**20:.0f} MiB, "
                          f"past the memory limit of {budget / 2**20:.0f} MiB; number the "
                          "regions 0..R-1 without gaps, or merge some")


def _input_function(problem, b: int):
    """``problem.forward`` at points of input ``b`` alone (its pre-layer inputs, target)."""
    rows = torch.tensor([b], device=problem.x.device)
    return lambda flat: problem.forward(flat, rows.expand(flat.shape[0]))


def _cross_terms(f, xb: torch.Tensor, U: torch.Tensor, out: torch.Tensor, max_memory,
                 bar, step: int) -> None:
    """``out[i, j] = (a * U_i) . H U_j`` ``[R, R]`` for one input ``xb [1, C*S]`` (the
    activation ``a``) and region indicators ``U [R, C*S]``: ``step`` directions ``U_j`` per
    engine call, each block counted on ``bar``."""
    for j0 in range(0, U.shape[0], step):
        block = U[j0:j0 + step]
        out[:, j0:j0 + block.shape[0]] = hessian_block(f, xb, block.unsqueeze(0), U.unsqueeze(0),
                                                       scale=xb, max_memory=max_memory)[0].T
        bar.update(block.shape[0])


@public_call
def taylor_cam(model, layer: torch.nn.Module | str, inputs, target=None, *, regions=None,
               order: int = 2, max_memory=None, additional_forward_args=None,
               progress: bool = False) -> TaylorCAMResult:
    """Second-order Taylor-CAM of ``layer``'s output (a conv feature map ``[B, C, *spatial]``).

    Args:
        model: callable ``model(*inputs) -> [B, ...]``; ``layer`` a module it calls once (or
            its submodule name in ``model``).
        inputs: tensor ``[B, ...]`` or tuple of tensors; target: output index per input (int,
            tuple, tensor ``[B]``, list), None for scalar outputs.
        regions: None (pairs of spatial cells: ``R = prod(spatial)``, cell ids in row-major
            order) or integer region ids shaped ``spatial`` or ``[B|1, *spatial]`` (pairs of
            regions, ``R = max id + 1``; an id with no cell gives zeros).
        order: 2 (the only order the paper defines).
        max_memory: bytes (or ``"512MB"``) per chunk of Hessian-vector products.
        additional_forward_args: more arguments of ``model(*inputs, *args)``, as in Captum: a
            tensor ``[B, ...]`` goes with its rows, ``[1, ...]`` to every row, anything else
            as is.
        progress: a tqdm bar over the ``B * R`` Hessian-vector products (one per input and
            region), counted a block of ``REGION_BLOCK`` regions at a time.
    Returns:
        :class:`TaylorCAMResult` with ``scores``/``cross`` ``[B, R, R]``.
    """
    if order != 2:
        raise ValueError(f"taylor_cam is defined for order=2 only, got order={order!r}")
    layer = named_layer(model, layer)
    tup, _ = as_tuple(inputs)
    if tup[0].dim() == 0 or tup[0].shape[0] == 0:
        raise ValueError(f"input 0 has shape {tuple(tup[0].shape)}; Taylor-CAM needs a "
                         "non-empty batch [B, ...]")
    fargs = forward_args(additional_forward_args)
    act = _activation(model, layer, tup, fargs, of_input=False)
    if act.dim() < 3:
        raise ValueError(f"layer output has shape {tuple(act.shape)}; Taylor-CAM needs a "
                         "feature map [B, C, *spatial]")
    B, C, spatial = act.shape[0], act.shape[1], tuple(act.shape[2:])
    problem = make_problem(layer_replaced_forward(model, layer, of_input=False), act, None,
                           target, additional_forward_args=tup + fargs)
    ids = _region_ids(regions, spatial, B, act.device)
    R = int(ids.max()) + 1
    _check_result_fits(B, R, problem.x, max_memory)
    cross = problem.x.new_zeros(B, R, R)
    with progress_bar(progress, total=B * R, desc="Taylor-CAM", unit="HVP") as bar:
        for b in range(B):  # one input at a time: its own pre-layer inputs and target
            # U [R, C*S]: indicator of region r on every channel of its cells
            U = torch.nn.functional.one_hot(ids[b if ids.shape[0] > 1 else 0].reshape(-1), R).T
            U = U.to(problem.x.dtype).unsqueeze(1).expand(-1, C, -1).reshape(R, -1)  # (int64
            # first took 3x U: its expanded copy and the cast)
            _cross_terms(_input_function(problem, b), problem.x[b:b + 1], U, cross[b],
                         max_memory, bar, REGION_BLOCK if progress else R)
    scores = cross.pow(2) + cross.transpose(1, 2).pow(2)
    return TaylorCAMResult(scores, cross, ids)
