"""Section 2 of docs/algorithm.md (distribution-aware group advantage) and DAPO's reward-side pieces.

`group_advantages`: A_i = r_i - mean_g(r), optionally divided by (unbiased std_g(r) + eps), where the
group statistics run over the group's on-policy rows only; expert rows get r - baseline as well
(divided likewise). A group with a single counted row uses mean 0 and std 1 (the reference code's
convention), so its advantage is its reward. Computed with scatter ops over group ids: no loop.

Departures: `expert_in_baseline=True` counts expert rewards in the group statistics, as LUFFY
and RL-PLUS do; CalibRL leaves them out (the default).

`overlong_penalty` is DAPO's soft overlong punishment and `informative_groups` is DAPO's
dynamic-sampling filter, keyed on the verifier's pass/fail (a group whose on-policy responses all
pass or all fail carries no on-policy signal).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _dense_group_ids(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids (B,) to 0..G-1; returns (inverse (B,), G)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, uniq.numel()


def group_stats(values: Tensor, group_ids: Tensor, counted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row group count, mean and unbiased std of `values` over the rows where `counted`.

    values: (B,) float; group_ids: (B,) long; counted: (B,) bool. Returns three (B,) tensors, each
    row holding its group's statistic. A group with fewer than two counted rows has std 1 and mean 0.
    """
    inverse, num_groups = _dense_group_ids(group_ids)
    dtype = torch.float64  # sums of many rewards: keep the mean exact enough for equality tests
    w = counted.to(dtype)
    v = values.to(dtype)
    count = torch.zeros(num_groups, dtype=dtype, device=values.device).index_add_(0, inverse, w)
    total = torch.zeros_like(count).index_add_(0, inverse, w * v)
    mean = total / count.clamp(min=1)
    dev = (v - mean[inverse]) * w
    sq = torch.zeros_like(count).index_add_(0, inverse, dev * dev)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    single = count < 2
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return count[inverse], mean[inverse].to(values.dtype), std[inverse].to(values.dtype)


def group_advantages(rewards: Tensor, group_ids: Tensor, is_expert: Tensor, *, std_normalize: bool = False,
                     eps: float = 1e-6, expert_in_baseline: bool = False) -> Tensor:
    """Section 2: A = r - mean_g(r) (or / (std_g(r) + eps) with `std_normalize`).

    rewards: (B,) float; group_ids: (B,) long, any values; is_expert: (B,) bool. The mean and std
    run over the group's on-policy rows (and its experts when `expert_in_baseline`). Returns (B,).
    """
    counted = torch.ones_like(is_expert) if expert_in_baseline else ~is_expert
    _, mean, std = group_stats(rewards, group_ids, counted)
    adv = rewards - mean
    if std_normalize:
        adv = adv / (std + eps)
    return adv


def overlong_penalty(response_length: Tensor, *, max_length: int, buffer_tokens: int,
                     penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_length - buffer_tokens,
    then falling linearly to -penalty at max_length (and below past it).

    response_length: (B,) long. Returns (B,) float32 <= 0; all zeros when buffer_tokens == 0.
    """
    if buffer_tokens <= 0:
        return torch.zeros(response_length.shape, dtype=torch.float32, device=response_length.device)
    excess = response_length.to(torch.float32) - (max_length - buffer_tokens)
    return (-excess / buffer_tokens * penalty).clamp(max=0.0)


def informative_groups(passed: Tensor, group_ids: Tensor, is_expert: Tensor) -> Tensor:
    """DAPO dynamic-sampling filter: True for rows of groups whose on-policy pass rate is strictly
    between 0 and 1 (not all-pass, not all-fail). passed, is_expert: (B,) bool; group_ids: (B,) long.
    Returns (B,) bool.
    """
    count, mean, _ = group_stats(passed.to(torch.float32), group_ids, ~is_expert)
    # group_stats zeroes the mean of one-row groups; a single response is never informative
    return (count >= 2) & (mean > 0) & (mean < 1)
