"""A straightforward per-sample Python implementation of the calibration stage, written from
docs/algorithm.md sections 2, 4 and 6 (and DAPO's shaping) with no vectorisation: a loop over groups and
samples, Python lists for rows, `torch.tensor` once at the end. The benchmark and the tests compare
`calibrl.algo.CalibrationStage` + `attach_expert_logprobs` against it.
"""

from __future__ import annotations

import math
import random

import torch


def reference_assemble(groups, *, pad_token_id, mixup="random", mix_ratio=1.0, pass_low=0.0, pass_high=1.0,
                       experts_per_group=1, expert_in_baseline=False, expert_reward=1.1, std_normalize=False,
                       eps=1e-6, dynamic_sampling=False, max_response_length=None, overlong_buffer_tokens=0,
                       overlong_penalty=1.0, seed=0, max_groups=None):
    """groups: list of calibrl.algo.Group. Returns a dict with the TrainBatch's tensor fields."""
    rng = random.Random(seed)
    kept_groups = []
    for g in groups:
        u = rng.random()
        passes = [v.passed for v in g.verdicts]
        rate = sum(passes) / len(passes)
        if dynamic_sampling and (rate == 0.0 or rate == 1.0):
            continue
        if mixup == "random":
            keep = u < mix_ratio
        elif mixup == "pass":
            keep = pass_low <= rate <= pass_high
        else:
            keep = mixup == "always"
        kept_groups.append((g, keep))
    if max_groups is not None:
        kept_groups = kept_groups[:max_groups]

    rows = []
    for gi, (g, keep) in enumerate(kept_groups):
        first = len(rows)
        for resp, v in zip(g.responses, g.verdicts):
            ids = list(resp.token_ids)
            reward = v.reward
            if overlong_buffer_tokens > 0:
                expected = max_response_length - overlong_buffer_tokens
                reward += min(-(len(ids) - expected) / overlong_buffer_tokens * overlong_penalty, 0.0)
            rows.append({"group": gi, "ids": ids, "logp": list(resp.logprobs), "reward": reward,
                         "accuracy": v.accuracy, "format_ok": v.format_ok, "passed": v.passed,
                         "expert": False, "version": resp.weights_version,
                         "prompt": list(g.prompt_token_ids)})
        experts = g.experts[:experts_per_group] if keep else []
        expert_row = first + len(g.responses) if experts else -1
        for e in experts:
            ids = list(e.token_ids)
            rows.append({"group": gi, "ids": ids, "logp": [0.0] * len(ids), "reward": expert_reward,
                         "accuracy": 1.0, "format_ok": True, "passed": True, "expert": True, "version": -1,
                         "prompt": list(g.prompt_token_ids)})
        for r in rows[first:]:
            r["expert_row"] = expert_row

    # section 2: per-sample advantage from its group's statistics
    members = {}
    for r in rows:
        if expert_in_baseline or not r["expert"]:
            members.setdefault(r["group"], []).append(r["reward"])
    for r in rows:
        rewards = members.get(r["group"], [])
        if len(rewards) < 2:
            mean, std = 0.0, 1.0
        else:
            mean = sum(rewards) / len(rewards)
            std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1))
        adv = r["reward"] - mean
        r["advantage"] = adv / (std + eps) if std_normalize else adv

    width = max((len(r["ids"]) for r in rows), default=0)
    prompt_width = max((len(r["prompt"]) for r in rows), default=0)
    out = {
        "prompt_ids": torch.tensor([[pad_token_id] * (prompt_width - len(r["prompt"])) + r["prompt"]
                                    for r in rows], dtype=torch.long).reshape(len(rows), prompt_width),
        "prompt_mask": torch.tensor([[False] * (prompt_width - len(r["prompt"])) + [True] * len(r["prompt"])
                                     for r in rows], dtype=torch.bool).reshape(len(rows), prompt_width),
        "response_ids": torch.tensor([r["ids"] + [pad_token_id] * (width - len(r["ids"])) for r in rows],
                                     dtype=torch.long).reshape(len(rows), width),
        "response_mask": torch.tensor([[True] * len(r["ids"]) + [False] * (width - len(r["ids"]))
                                       for r in rows], dtype=torch.bool).reshape(len(rows), width),
        "rollout_logp": torch.tensor([r["logp"] + [0.0] * (width - len(r["ids"])) for r in rows],
                                     dtype=torch.float32).reshape(len(rows), width),
        "rewards": torch.tensor([r["reward"] for r in rows], dtype=torch.float32),
        "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32),
        "accuracy": torch.tensor([r["accuracy"] for r in rows], dtype=torch.float32),
        "format_ok": torch.tensor([r["format_ok"] for r in rows], dtype=torch.bool),
        "passed": torch.tensor([r["passed"] for r in rows], dtype=torch.bool),
        "is_expert": torch.tensor([r["expert"] for r in rows], dtype=torch.bool),
        "group_index": torch.tensor([r["group"] for r in rows], dtype=torch.long),
        "has_expert": torch.tensor([r["expert_row"] >= 0 for r in rows], dtype=torch.bool),
        "expert_row": torch.tensor([r["expert_row"] for r in rows], dtype=torch.long),
        "response_length": torch.tensor([len(r["ids"]) for r in rows], dtype=torch.long),
        "weights_version": torch.tensor([r["version"] for r in rows], dtype=torch.long),
    }
    return out


def reference_attach(batch: dict, old_logp: torch.Tensor) -> dict:
    """Section 4's b_t, one row at a time: row i gets, at each position t, the mean old log-prob of
    its group's experts that reach t (zero where none does), and the mean of the experts' means
    over their own lengths."""
    rows, width = old_logp.shape
    lengths = batch["response_length"].tolist()
    expert_rows = batch["expert_row"].tolist()
    groups = batch["group_index"].tolist()
    is_expert = batch["is_expert"].tolist()
    masked = [old_logp[i, :lengths[i]].tolist() + [0.0] * (width - lengths[i]) for i in range(rows)]
    expert_old, expert_mean = [], []
    for i in range(rows):
        if expert_rows[i] < 0:
            expert_old.append([0.0] * width)
            expert_mean.append(0.0)
            continue
        mine = [e for e in range(rows) if is_expert[e] and groups[e] == groups[i]]
        b = []
        for t in range(width):
            covering = [masked[e][t] for e in mine if t < lengths[e]]
            b.append(sum(covering) / len(covering) if covering else 0.0)
        expert_old.append(b)
        expert_mean.append(sum(sum(masked[e]) / max(lengths[e], 1) for e in mine) / len(mine))
    batch["old_logp"] = torch.tensor(masked, dtype=torch.float32).reshape(rows, width)
    batch["expert_old_logp"] = torch.tensor(expert_old, dtype=torch.float32).reshape(rows, width)
    batch["expert_mean_logp"] = torch.tensor(expert_mean, dtype=torch.float32)
    return batch
