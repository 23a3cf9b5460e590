"""Per-token entropy and log-probs from logits, in chunks (section 5 logs the policy entropy).

A (B, T, vocab) float32 softmax of a 150k-token vocabulary is gigabytes per sequence; these
functions never build one for more than `chunk_size` tokens at a time, in the forward pass and
in the backward pass (custom autograd functions recompute the softmax chunk by chunk from the
saved logits instead of storing it). Outputs are float32 whatever the logits' dtype.

Not in the paper: it only says entropy is logged. `logprobs_from_logits` is the learner's
log pi(y_t) and has the same memory bound.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _as_rows(logits: Tensor) -> Tensor:
    """(..., T, V) or (N, V) -> (R, T, V) view (no copy when the leading dims merge)."""
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.reshape(-1, *logits.shape[-2:])


def _chunks(rows: int, length: int, chunk_size: int) -> Iterator[tuple[int, slice]]:
    for r in range(rows):
        for start in range(0, length, chunk_size):
            yield r, slice(start, min(start + chunk_size, length))


class _ChunkedEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int) -> Tensor:
        rows = _as_rows(logits)
        out = torch.empty(rows.shape[:2], dtype=torch.float32, device=logits.device)
        for r, cols in _chunks(rows.shape[0], rows.shape[1], chunk_size):
            x = rows[r, cols].float()
            logz = torch.logsumexp(x, dim=-1, keepdim=True)
            out[r, cols] = logz.squeeze(-1) - (torch.softmax(x, dim=-1) * x).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.chunk_size = chunk_size
        return out.reshape(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        logits, ent = ctx.saved_tensors
        rows = _as_rows(logits)
        grad_rows = grad_out.reshape(rows.shape[:2])
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        for r, cols in _chunks(rows.shape[0], rows.shape[1], ctx.chunk_size):
            logp = torch.log_softmax(rows[r, cols].float(), dim=-1)
            # dH/dx_j = -p_j (log p_j + H)
            g = -logp.exp() * (logp + ent.reshape(rows.shape[:2])[r, cols].unsqueeze(-1))
            grad[r, cols] = (g * grad_rows[r, cols].unsqueeze(-1)).to(grad.dtype)
        return grad.reshape(logits.shape), None


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        rows = _as_rows(logits)
        label_rows = labels.reshape(rows.shape[:2])
        logz = torch.empty(rows.shape[:2], dtype=torch.float32, device=logits.device)
        picked = torch.empty_like(logz)
        for r, cols in _chunks(rows.shape[0], rows.shape[1], chunk_size):
            x = rows[r, cols].float()
            logz[r, cols] = torch.logsumexp(x, dim=-1)
            picked[r, cols] = x.gather(-1, label_rows[r, cols].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, labels, logz)
        ctx.chunk_size = chunk_size
        return (picked - logz).reshape(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        logits, labels, logz = ctx.saved_tensors
        rows = _as_rows(logits)
        label_rows = labels.reshape(rows.shape[:2])
        grad_rows = grad_out.reshape(rows.shape[:2])
        grad = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        for r, cols in _chunks(rows.shape[0], rows.shape[1], ctx.chunk_size):
            go = grad_rows[r, cols].unsqueeze(-1)
            # d logp(y)/dx_j = 1[j = y] - p_j
            g = -torch.exp(rows[r, cols].float() - logz[r, cols].unsqueeze(-1)) * go
            g.scatter_add_(-1, label_rows[r, cols].unsqueeze(-1), go)
            grad[r, cols] = g.to(grad.dtype)
        return grad.reshape(logits.shape), None, None


def entropy_from_logits(logits: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per-token entropy H = logsumexp(x) - sum softmax(x) x of the distribution over the last dim.

    logits: (..., V), any float dtype. Returns (...) float32, differentiable; at most `chunk_size`
    tokens' (chunk_size, V) float32 softmax exist at once, forward or backward.
    """
    return _ChunkedEntropy.apply(logits, chunk_size)


def logprobs_from_logits(logits: Tensor, labels: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits)[label] per token. logits: (..., V); labels: (...) long. Returns (...)
    float32, differentiable, with the same chunked memory bound as `entropy_from_logits`."""
    return _ChunkedLogprobs.apply(logits, labels, chunk_size)
