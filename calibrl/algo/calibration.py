"""The calibration stage: completed groups in, one padded `TrainBatch` plus metrics out.

It ties sections 2 and 6 of docs/algorithm.md (and DAPO's reward-side pieces) to the data: the driver
calls `add(group)` as each group comes back from rollout + verification (converting that group's
token lists to arrays there, overlapping the wait for the next group), then `assemble()` once. At
assembly, with tensor ops over all rows:

1. dynamic sampling (optional): drop groups whose on-policy responses all pass or all fail;
2. mixup policy (section 6): per group, keep or drop its experts (up to `experts_per_group`);
3. pad prompts (left) and responses (right) with one masked scatter each;
4. rewards: the verdicts' rewards plus DAPO's overlong penalty on on-policy rows; expert rows get
   `expert_reward` (1.1 by default: experts are correct by construction of the dataset and the
   demo data writes them in the <think>/<answer> format; the driver does not verify them);
5. section 2's group advantages (`group_advantages`, experts out of the baseline unless
   `expert_in_baseline`, as for LUFFY / RL-PLUS);
6. `expert_row`: each row's pointer to its group's first kept expert, for `attach_expert_logprobs`.

Departures: groups are kept in the order they were added; the stage is single-use (one per
training step, seeded per step by the caller), so a run's expert draws do not depend on how
groups were batched before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from calibrl.algo.advantages import group_advantages, overlong_penalty
from calibrl.algo.batch import Group, TrainBatch
from calibrl.algo.mixup import MIXUP_POLICIES


@dataclass
class _Pending:
    """One added group, converted to arrays."""

    prompt_id: str
    prompt: np.ndarray
    images: list[bytes]
    response_ids: list[np.ndarray]
    response_logp: list[np.ndarray]
    expert_ids: list[np.ndarray]
    rewards: list[float]
    accuracy: list[float]
    format_ok: list[bool]
    passed: list[bool]
    truncated: list[bool]
    weights_version: list[int]
    pass_rate: float
    uniform: float


def _pad(flat: Tensor, lengths: Tensor, width: int, fill: float, *, left: bool) -> tuple[Tensor, Tensor]:
    """Rows of `lengths` taken in order from `flat` into a (R, width) tensor; returns (padded, mask)."""
    pos = torch.arange(width)
    mask = pos >= (width - lengths).unsqueeze(-1) if left else pos < lengths.unsqueeze(-1)
    out = torch.full((lengths.numel(), width), fill, dtype=flat.dtype)
    return out.masked_scatter_(mask, flat), mask


def _concat(arrays: list[np.ndarray], dtype: type) -> Tensor:
    return torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype))


class CalibrationStage:
    """Collects one training step's groups and assembles the `TrainBatch` (see the module docstring).

    Keywords (numbers as in `AlgorithmConfig`): pad_token_id; mixup in MIXUP_POLICIES, mix_ratio,
    pass_low, pass_high; experts_per_group (the first k of Group.experts); expert_in_baseline;
    expert_reward; std_normalize, eps; dynamic_sampling; max_response_length,
    overlong_buffer_tokens, overlong_penalty (DAPO shaping, off when overlong_buffer_tokens == 0);
    seed (the per-group uniform draws of the `random` policy).
    """

    def __init__(self, *, pad_token_id: int, mixup: str = "random", mix_ratio: float = 1.0,
                 pass_low: float = 0.0, pass_high: float = 1.0, experts_per_group: int = 1,
                 expert_in_baseline: bool = False,
                 expert_reward: float = 1.1, std_normalize: bool = False, eps: float = 1e-6,
                 dynamic_sampling: bool = False, max_response_length: int | None = None,
                 overlong_buffer_tokens: int = 0, overlong_penalty: float = 1.0, seed: int = 0):
        if mixup not in MIXUP_POLICIES:
            raise ValueError(f"unknown mixup policy {mixup!r}; choose one of {', '.join(MIXUP_POLICIES)}")
        if overlong_buffer_tokens > 0 and max_response_length is None:
            raise ValueError("overlong shaping (overlong_buffer_tokens > 0) needs max_response_length")
        self.pad_token_id = pad_token_id
        self.mixup, self.mix_ratio, self.pass_low, self.pass_high = mixup, mix_ratio, pass_low, pass_high
        self.experts_per_group = experts_per_group
        self.expert_in_baseline = expert_in_baseline
        self.expert_reward = expert_reward
        self.std_normalize, self.eps = std_normalize, eps
        self.dynamic_sampling = dynamic_sampling
        self.max_response_length = max_response_length
        self.overlong_buffer_tokens, self.overlong_penalty = overlong_buffer_tokens, overlong_penalty
        self._rng = random.Random(seed)
        self._pending: list[_Pending] = []
        self._assembled = False

    @property
    def num_groups(self) -> int:
        """Groups added so far."""
        return len(self._pending)

    @property
    def num_informative(self) -> int:
        """Groups added so far whose on-policy responses neither all pass nor all fail."""
        return sum(1 for p in self._pending if 0.0 < p.pass_rate < 1.0)

    def add(self, group: Group) -> None:
        """Take one completed, verified group (called as each group arrives)."""
        if self._assembled:
            raise RuntimeError("this CalibrationStage was already assembled; make one per training step")
        n = len(group.responses)
        if n != len(group.verdicts) or (n == 0 and not group.experts):
            raise ValueError(f"group {group.prompt_id!r}: {n} responses but {len(group.verdicts)} verdicts "
                             "(need one verdict per response, and a response or an expert)")
        response_ids = [np.asarray(r.token_ids, dtype=np.int64) for r in group.responses]
        response_logp = [np.asarray(r.logprobs, dtype=np.float32) for r in group.responses]
        for i, (ids, lp) in enumerate(zip(response_ids, response_logp)):
            if ids.shape != lp.shape or ids.ndim != 1:
                raise ValueError(f"group {group.prompt_id!r}, response {i}: {ids.shape} token ids but "
                                 f"{lp.shape} log-probs")
        passed = [v.passed for v in group.verdicts]
        self._pending.append(_Pending(
            prompt_id=group.prompt_id,
            prompt=np.asarray(group.prompt_token_ids, dtype=np.int64),
            images=list(group.images),
            response_ids=response_ids,
            response_logp=response_logp,
            expert_ids=[np.asarray(e.token_ids, dtype=np.int64)
                        for e in group.experts[:self.experts_per_group]],
            rewards=[v.reward for v in group.verdicts],
            accuracy=[v.accuracy for v in group.verdicts],
            format_ok=[v.format_ok for v in group.verdicts],
            passed=passed,
            truncated=[r.finish_reason == "length" for r in group.responses],
            weights_version=[r.weights_version for r in group.responses],
            pass_rate=sum(passed) / n if n else 0.0,  # an expert-only group (SFT) has no on-policy rows
            uniform=self._rng.random(),  # drawn for every group so the stream ignores the policy
        ))

    def assemble(self, max_groups: int | None = None) -> tuple[TrainBatch, dict[str, float]]:
        """Build the batch from the added groups (the first `max_groups` survivors of the
        dynamic-sampling filter, if given). Returns (TrainBatch, metrics of floats)."""
        self._assembled = True
        added = self._pending
        all_pass = sum(1 for p in added if p.pass_rate == 1.0)
        all_fail = sum(1 for p in added if p.pass_rate == 0.0)
        groups = [p for p in added if 0.0 < p.pass_rate < 1.0] if self.dynamic_sampling else list(added)
        groups = groups[:max_groups] if max_groups is not None else groups

        pass_rate = torch.tensor([p.pass_rate for p in groups], dtype=torch.float32)
        uniform = torch.tensor([p.uniform for p in groups], dtype=torch.float32)
        keep = MIXUP_POLICIES[self.mixup](pass_rate, uniform, mix_ratio=self.mix_ratio,
                                          pass_low=self.pass_low, pass_high=self.pass_high).tolist()

        # per-row columns, group by group: on-policy responses, then kept experts
        ids_arrays: list[np.ndarray] = []
        logp_arrays: list[np.ndarray] = []
        n_resp, n_exp, rewards, accuracy, format_ok, passed, truncated, version = (
            [], [], [], [], [], [], [], [])
        for p, keep_expert in zip(groups, keep):
            experts = p.expert_ids if keep_expert else []
            ids_arrays += p.response_ids + experts
            logp_arrays += p.response_logp
            n_resp.append(len(p.response_ids))
            n_exp.append(len(experts))
            rewards += p.rewards + [self.expert_reward] * len(experts)
            accuracy += p.accuracy + [1.0] * len(experts)
            format_ok += p.format_ok + [True] * len(experts)
            passed += p.passed + [True] * len(experts)
            truncated += p.truncated + [False] * len(experts)
            version += p.weights_version + [-1] * len(experts)

        n_resp_t = torch.tensor(n_resp, dtype=torch.long)
        n_exp_t = torch.tensor(n_exp, dtype=torch.long)
        rows_per_group = n_resp_t + n_exp_t
        num_groups = len(groups)
        group_index = torch.repeat_interleave(torch.arange(num_groups), rows_per_group)
        first_row = torch.cumsum(rows_per_group, 0) - rows_per_group
        offset_in_group = torch.arange(group_index.numel()) - first_row[group_index]
        is_expert = offset_in_group >= n_resp_t[group_index]
        first_expert = torch.where(n_exp_t > 0, first_row + n_resp_t, torch.full_like(first_row, -1))
        expert_row = first_expert[group_index]

        # padding: one masked scatter per tensor
        lengths = torch.tensor([a.shape[0] for a in ids_arrays], dtype=torch.long)
        width = int(lengths.max()) if lengths.numel() else 0
        response_ids, response_mask = _pad(_concat(ids_arrays, np.int64), lengths, width, self.pad_token_id,
                                           left=False)
        rollout_logp = torch.zeros(response_ids.shape, dtype=torch.float32)
        rollout_logp.masked_scatter_(response_mask & ~is_expert.unsqueeze(-1),
                                   _concat(logp_arrays, np.float32))
        prompt_lengths = torch.tensor([p.prompt.shape[0] for p in groups], dtype=torch.long)
        prompt_width = int(prompt_lengths.max()) if num_groups else 0
        group_prompts, group_prompt_mask = _pad(_concat([p.prompt for p in groups], np.int64), prompt_lengths,
                                                prompt_width, self.pad_token_id, left=True)

        # rewards and advantages
        rewards_t = torch.tensor(rewards, dtype=torch.float32)
        penalty = torch.zeros_like(rewards_t)
        if self.overlong_buffer_tokens > 0:
            penalty = overlong_penalty(lengths, max_length=self.max_response_length,
                                       buffer_tokens=self.overlong_buffer_tokens,
                                       penalty=self.overlong_penalty) * (~is_expert)
            rewards_t = rewards_t + penalty
        advantages = group_advantages(rewards_t, group_index, is_expert, std_normalize=self.std_normalize,
                                      eps=self.eps, expert_in_baseline=self.expert_in_baseline)

        # old_logp / expert_old_logp: zeros until attach_expert_logprobs replaces them; a broadcast
        # view of one zero takes no memory (in-place writes to it raise: assign new tensors instead)
        zeros = torch.zeros((), dtype=torch.float32).expand(response_ids.shape)
        batch = TrainBatch(
            prompt_ids=group_prompts[group_index],
            prompt_mask=group_prompt_mask[group_index],
            response_ids=response_ids,
            response_mask=response_mask,
            rollout_logp=rollout_logp,
            old_logp=zeros,
            expert_old_logp=zeros,
            rewards=rewards_t,
            advantages=advantages,
            accuracy=torch.tensor(accuracy, dtype=torch.float32),
            format_ok=torch.tensor(format_ok, dtype=torch.bool),
            passed=torch.tensor(passed, dtype=torch.bool),
            is_expert=is_expert,
            group_index=group_index,
            has_expert=expert_row >= 0,
            expert_row=expert_row,
            expert_mean_logp=torch.zeros(len(lengths), dtype=torch.float32),
            response_length=lengths,
            weights_version=torch.tensor(version, dtype=torch.long),
            prompt_images=[groups[g].images for g in group_index.tolist()],
            row_prompt_id=[groups[g].prompt_id for g in group_index.tolist()],
        )

        on = ~is_expert
        on_f = on.to(torch.float32)
        n_on = max(float(on_f.sum()), 1.0)
        metrics = {
            "groups_added": float(len(added)),
            "groups": float(num_groups),
            "groups_all_pass": float(all_pass),
            "groups_all_fail": float(all_fail),
            "groups_dropped": float(len(added) - num_groups),
            "rows": float(len(lengths)),
            "expert_rows": float(is_expert.sum()),
            "expert_kept_frac": float(sum(keep)) / max(num_groups, 1),
            "pass_rate": float((batch.passed.float() * on_f).sum()) / n_on,
            "accuracy": float((batch.accuracy * on_f).sum()) / n_on,
            "format_ok": float((batch.format_ok.float() * on_f).sum()) / n_on,
            "reward_mean": float((rewards_t * on_f).sum()) / n_on,
            "advantage_abs_mean": float((advantages.abs() * on_f).sum()) / n_on,
            "overlong_penalty_mean": float(penalty.sum()) / n_on,
            "response_length_mean": float((lengths.float() * on_f).sum()) / n_on,
            "response_length_max": float((lengths * on).max()) if num_groups else 0.0,
            "truncated_frac": float(sum(truncated)) / n_on,
        }
        self._pending = []
        return batch, metrics
