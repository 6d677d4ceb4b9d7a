"""Target log-probs from a linear LM head, with a backward that touches only the asked columns.

``f[n, t] = log_softmax(h[n, t] W^T + c)[y_t]`` for hidden states ``h [N, T, d]`` (the head's
input), logits ``L = h W^T + c [N, T, V]`` (already computed by the model: reused) and targets
``y [T]``. Its gradient is ``d f[n, t] / d h[n, t] = (onehot(y_t) - softmax(L[n, t])) W``
(zero at the other positions). Autograd through the model's own head would compute that for
all ``T`` positions in each of the ``T`` backward passes of a generation (one pass per target,
each a one-hot column of ``grad_out``): a full ``[N, T, V] x [V, d]`` product and a full
log-softmax backward per pass. :class:`HeadLogProb`'s backward computes only the columns of
``grad_out`` that are nonzero (one per pass): ``1/T`` of that work. It finds them on the host,
so it is meant for the CPU's serial passes.
"""
from __future__ import annotations

import contextlib

import torch

from taylor_kernels.engine.thread_hooks import this_thread
from taylor_kernels.numerics import accumulation_dtype
from taylor_kernels.models.module_kinds import runs_torch_forward


class HeadLogProb(torch.autograd.Function):
    """``f = HeadLogProb.apply(h, logits, weight, targets)``: ``[N, T]`` log-probs (float32;
    float64 for float64 logits) of
    ``targets [T]`` from ``logits [N, T, V]`` (values only: no gradient flows through them),
    differentiable in ``h [N, T, d]`` through the head ``weight [V, d]``."""

    @staticmethod
    def forward(ctx, h, logits, weight, targets):
        logp = torch.log_softmax(logits.detach().to(accumulation_dtype(logits.dtype)), dim=-1)
        ctx.save_for_backward(logp, weight, targets)
        ctx.h_dtype = h.dtype
        index = targets.expand(logp.shape[0], -1)[..., None]
        return logp.gather(2, index).squeeze(2)

    @staticmethod
    def backward(ctx, grad_out):
        logp, weight, targets = ctx.saved_tensors
        N, T, V = logp.shape
        grad_h = torch.zeros(N, T, weight.shape[1], dtype=ctx.h_dtype, device=logp.device)
        for t in grad_out.abs().sum(0).nonzero().flatten().tolist():
            g = -logp[:, t].exp() * grad_out[:, t, None]                  # [N, V]
            g[:, targets[t]] += grad_out[:, t]
            grad_h[:, t] = g.to(weight.dtype) @ weight
        return grad_h, None, None, None


def linear_head(model) -> torch.nn.Linear | None:
    """The model's output embedding (``get_output_embeddings()``) when it computes
    ``h W^T + b`` (an ``nn.Linear`` running torch's own forward), else None: a subclass with
    more in its forward (Dory's per-token logit scale, a LoRA or quantized layer) takes
    autograd's backward, which :class:`HeadLogProb` would get wrong."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear) or not runs_torch_forward(head):
        return None
    return head


@contextlib.contextmanager
def tapped(head: torch.nn.Linear | None):
    """Within the block, each call of ``head`` appends ``(input, output, output._version)`` to
    the yielded list; nothing is recorded when ``head`` is None or another forward hook (the
    head's own or a global one) could rewrite its output."""
    seen: list = []
    if head is None or head._forward_hooks or torch.nn.modules.module._global_forward_hooks:
        yield seen
        return
    hook = head.register_forward_hook(this_thread(
        lambda m, i, o: seen.append((i[0], o, o._version))))
    try:
        yield seen
    finally:
        hook.remove()


def target_log_probs(logits: torch.Tensor, targets: torch.Tensor,
                     head: torch.nn.Linear | None, seen: list) -> torch.Tensor:
    """``log_softmax(logits)[..., y_t]`` ``[N, T]`` (float32; float64 for float64 logits: a
    float64 model got float32 accuracy) for ``logits [N, T, V]``,
    ``targets [T]``: through :class:`HeadLogProb` when ``logits`` is exactly the one output
    :func:`tapped` recorded for ``head`` (same storage, unmodified since), else by autograd."""
    if len(seen) == 1:
        h, out, version = seen[0]
        if out.shape == logits.shape and out.data_ptr() == logits.data_ptr() and \
                logits._version == version:
            return HeadLogProb.apply(h, logits, head.weight, targets)
    logp = torch.log_softmax(logits.to(accumulation_dtype(logits.dtype)), dim=-1)
    return logp.gather(2, targets.expand(logits.shape[0], -1)[..., None]).squeeze(2)
