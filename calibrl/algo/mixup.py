"""Section 6 of docs/algorithm.md: whether each group keeps its expert row (mixup policies).

Every policy has the signature `policy(pass_rate, uniform, *, mix_ratio, pass_low, pass_high)` and
is vectorised over groups: pass_rate, uniform: (G,) float (uniform: one U[0, 1) draw per group,
drawn by the caller whatever the policy, so the random stream does not depend on the policy).
Returns (G,) bool, True = keep the expert.

- random: keep with probability mix_ratio (1.0 in the paper's main run);
- pass: keep when pass_low <= on-policy pass rate <= pass_high;
- always / never.

The expert-free warm-up of N steps is the caller's: it passes `never` for those steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def keep_random(pass_rate: Tensor, uniform: Tensor, *, mix_ratio: float = 1.0, pass_low: float = 0.0,
                pass_high: float = 1.0) -> Tensor:
    return uniform < mix_ratio


def keep_by_pass_rate(pass_rate: Tensor, uniform: Tensor, *, mix_ratio: float = 1.0, pass_low: float = 0.0,
                      pass_high: float = 1.0) -> Tensor:
    return (pass_rate >= pass_low) & (pass_rate <= pass_high)


def keep_always(pass_rate: Tensor, uniform: Tensor, *, mix_ratio: float = 1.0, pass_low: float = 0.0,
                pass_high: float = 1.0) -> Tensor:
    return torch.ones_like(pass_rate, dtype=torch.bool)


def keep_never(pass_rate: Tensor, uniform: Tensor, *, mix_ratio: float = 1.0, pass_low: float = 0.0,
               pass_high: float = 1.0) -> Tensor:
    return torch.zeros_like(pass_rate, dtype=torch.bool)


MIXUP_POLICIES: dict[str, Callable[..., Tensor]] = {
    "random": keep_random,
    "pass": keep_by_pass_rate,
    "always": keep_always,
    "never": keep_never,
}
