"""Step metrics as pure functions on the batch and on per-rank metric dicts (no ray, no I/O).

- `stage_metrics`: the calibration stage's counts under the names the run logs
  (`reward/mean`, `acc/mean`, `groups/*`, `calib/*`);
- `batch_metrics`: policy entropy on on-policy and expert tokens, the rollout-vs-learner log-prob
  gap, the expert-minus-policy log-prob gap (CalibRL's baseline against the policy), response
  length, weights staleness, and the fraction of on-policy rows with a non-zero advantage;
- `reduce_rank_metrics`: the learners' per-rank metrics as one dict.
"""

from __future__ import annotations

from torch import Tensor

from calibrl.algo.batch import TrainBatch

MAX_OVER_RANKS = ("train/lr", "train/grad_norm", "train/update_norm", "train/skipped_updates",
                  "train/nonfinite_updates", "train/nonfinite_trailing", "train/updates_applied")


def stage_metrics(stage: dict[str, float]) -> dict[str, float]:
    """`CalibrationStage.assemble`'s metrics, each under `calib/`, plus the headline names."""
    groups = max(stage["groups_added"], 1.0)
    return {f"calib/{k}": v for k, v in stage.items()} | {
        "reward/mean": stage["reward_mean"], "acc/mean": stage["accuracy"],
        "acc/pass_rate": stage["pass_rate"],
        "groups/all_pass_frac": stage["groups_all_pass"] / groups,
        "groups/all_fail_frac": stage["groups_all_fail"] / groups,
    }


def batch_metrics(batch: TrainBatch, entropy: Tensor, *, version: int) -> dict[str, float]:
    """Metrics of an assembled batch after its old log-probs are attached.

    entropy: (B, T) token entropy under the learner's current weights; version: the weights
    version that just trained (staleness = version - the version each row was sampled with)."""
    on = batch.response_mask & ~batch.is_expert.unsqueeze(-1)
    ex = batch.response_mask & batch.is_expert.unsqueeze(-1)
    on_rows = ~batch.is_expert
    staleness = (version - batch.weights_version[on_rows]).float()
    gap = (batch.old_logp - batch.rollout_logp)[on]
    nonzero = (batch.advantages[on_rows] != 0).float()

    def mean(x: Tensor) -> float:
        return float(x.mean()) if x.numel() else 0.0

    return {"policy/entropy": mean(entropy[on]),
            "policy/expert_entropy": mean(entropy[ex]),
            "policy/rollout_vs_learner_logp_gap": mean(gap.abs()),
            "policy/expert_minus_policy_logp": (mean(batch.expert_old_logp[on]) - mean(batch.old_logp[on]))
            if on.any() else 0.0,
            "response/length_mean": mean(batch.response_length[on_rows].float()),
            "adv/nonzero_frac": mean(nonzero),
            "weights/staleness_max": float(staleness.max()) if staleness.numel() else 0.0,
            "weights/staleness_mean": mean(staleness)}


def nonfinite_streak(streak: int, metrics: dict[str, float]) -> int:
    """Updates in a row skipped for a non-finite loss or gradient, after a step's learner metrics:
    a step that applied an update ends the old streak (only its own trailing skips count)."""
    if metrics.get("train/updates_applied", 0) > 0:
        return int(metrics.get("train/nonfinite_trailing", 0))
    return streak + int(metrics.get("train/nonfinite_updates", 0))


def reduce_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Each rank returns its share of the global loss metrics, so their sum is the global value;
    timings are the slowest rank's, and the names in MAX_OVER_RANKS (common values such as the
    learning rate and the global gradient norm) the largest."""
    out: dict[str, float] = {}
    for m in per_rank:
        for k, v in m.items():
            if k.startswith("time/") or k in MAX_OVER_RANKS:
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = out.get(k, 0.0) + v
    return out


def greedy_change_rate(before: dict[str, str], after: dict[str, str]) -> float:
    """Fraction of prompts (present in both) whose greedy answer text changed between two evaluations."""
    common = before.keys() & after.keys()
    return sum(before[k] != after[k] for k in common) / len(common) if common else 0.0



def gradient_shares(metrics: dict[str, float]) -> dict[str, float]:
    """`grad/calib_share`: ||d(lam * calib)/d logp|| / (||d pg/d logp|| + ||d(lam * calib)/d logp||) from the
    learner's summed squared norms `train/grad_sq_pg` and `train/grad_sq_calib` (empty without them)."""
    if "train/grad_sq_calib" not in metrics:
        return {}
    pg, calib = metrics.get("train/grad_sq_pg", 0.0) ** 0.5, metrics["train/grad_sq_calib"] ** 0.5
    return {"grad/calib_share": calib / (pg + calib) if pg + calib > 0 else 0.0}


def paired_gain(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """Mean per-prompt accuracy change over the prompts in both, and the half-width of its normal 95%
    interval (1.96 x the standard error of the paired differences)."""
    diffs = [after[k] - before[k] for k in before.keys() & after.keys()]
    if not diffs:
        return 0.0, 0.0
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return mean, 1.96 * (var / n) ** 0.5
