"""Chunked entropy and log-probs equal the direct computation, values and gradients."""

import pytest
import torch

from calibrl.algo import entropy_from_logits, logprobs_from_logits


def direct_entropy(logits):
    logp = torch.log_softmax(logits.double(), -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("shape, chunk", [((2, 7, 11), 3), ((5, 11), 2), ((2, 3, 4, 9), 64)])
def test_entropy_matches_direct(shape, chunk):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()
    ent = entropy_from_logits(logits, chunk_size=chunk)
    assert ent.dtype == torch.float32 and ent.shape == shape[:-1]
    weights = torch.randn(shape[:-1], generator=gen, dtype=torch.float64)
    (ent.double() * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    ref = direct_entropy(logits.double())
    (ref * weights).sum().backward()
    torch.testing.assert_close(ent.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, logits.grad, rtol=1e-4, atol=1e-5)


def test_logprobs_match_direct_on_a_non_contiguous_slice():
    gen = torch.Generator().manual_seed(1)
    full = (2 * torch.randn(3, 9, 13, generator=gen, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, 13, (3, 5), generator=gen)
    logits = full[:, 2:7]  # the response part of prompt+response logits
    out = logprobs_from_logits(logits, labels, chunk_size=2)
    weights = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    got = full.grad.clone()
    full.grad = None
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, full.grad, rtol=1e-4, atol=1e-5)


def test_bfloat16_logits():
    logits = torch.randn(2, 4, 50).to(torch.bfloat16)
    ent = entropy_from_logits(logits, chunk_size=3)
    torch.testing.assert_close(ent.double(), direct_entropy(logits), rtol=1e-4, atol=1e-4)
    uniform = entropy_from_logits(torch.zeros(1, 2, 50))
    torch.testing.assert_close(uniform, torch.full((1, 2), torch.log(torch.tensor(50.0)).item()))


def test_chunks_bound_memory():
    # a (tokens x vocab) float32 softmax for all tokens would be 64 MiB; chunks of 8 tokens are 256 KiB
    logits = torch.randn(1, 1024, 16384)
    before = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    ent = entropy_from_logits(logits, chunk_size=8)
    assert ent.shape == (1, 1024) and torch.isfinite(ent).all()
    assert before is None or torch.cuda.max_memory_allocated() - before < 32 * 2**20
